"""What building a `CocoDetection` found: images kept and left out, annotations dropped and why."""
from collections import Counter, defaultdict
from dataclasses import dataclass, field

EXAMPLES_PER_REASON = 5


@dataclass
class DatasetReport:
    """What construction found. `dropped`: reason -> annotations dropped; `examples`: reason ->
    the first messages (naming annotation ids / files)."""
    images_in_file: int = 0
    images_kept: int = 0
    images_without_targets: int = 0
    images_too_small: int = 0
    images_missing_file: int = 0
    missing_stuff_maps: int = 0
    instances: int = 0
    crowd: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def note(self, reason: str, message: str) -> None:
        self.dropped[reason] += 1
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(message)

    def summary(self) -> str:
        lines = [f"{self.images_kept}/{self.images_in_file} images kept ({self.images_without_targets} "
                 f"without usable instances, {self.images_too_small} smaller than min_size, "
                 f"{self.images_missing_file} missing files, {self.missing_stuff_maps} missing stuff "
                 f"maps); {self.instances} instances, {self.crowd} crowd"]
        for reason, count in sorted(self.dropped.items()):
            lines.append(f"  dropped {count} annotation(s): {reason}; e.g. " + "; ".join(self.examples[reason]))
        for reason in ("missing image file", "missing stuff map"):
            if self.examples.get(reason):
                lines.append(f"  {reason}: " + "; ".join(self.examples[reason]))
        return "\n".join(lines)
