// Reports the CUDA archs this extension was compiled for (python -m htc_fast.env prints them).
// nvcc defines __CUDA_ARCH_LIST__ as e.g. 800,900 in every compilation pass.
#include <string>

namespace htc_fast {

#define HTC_FAST_STR2(...) #__VA_ARGS__
#define HTC_FAST_STR(...) HTC_FAST_STR2(__VA_ARGS__)

std::string compiled_cuda_archs() {
#ifdef __CUDA_ARCH_LIST__
  std::string archs;
  for (char ch : std::string(HTC_FAST_STR(__CUDA_ARCH_LIST__))) {
    if (ch == ',') archs += ';';
    else if (ch != ' ') archs += ch;
  }
  // 800;900 -> 80;90 (the last digit of __CUDA_ARCH__ is always 0)
  std::string out, item;
  for (size_t i = 0; i <= archs.size(); ++i) {
    if (i == archs.size() || archs[i] == ';') {
      if (item.size() > 1) out += (out.empty() ? "" : ";") + item.substr(0, item.size() - 1);
      item.clear();
    } else {
      item += archs[i];
    }
  }
  return out;
#else
  return "unknown";
#endif
}

}  // namespace htc_fast
