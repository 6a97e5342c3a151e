"""Writing drawn images (htc_fast.inference.visualize.save_png): Pillow writes the PNG, the pixels
read back unchanged, and no warning is printed (torchvision 0.29's write_png prints one)."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from htc_fast.data.image_decode import read_rgb
from htc_fast.inference.visualize import save_png


def test_png_reads_back_with_the_same_pixels(tmp_path):
    h, w = torch.randint(1, 70, (2,)).tolist()
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    if torch.rand(()) < 0.5:  # the drawing functions may hand over a non-contiguous view
        image = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8).permute(2, 0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_png(image, tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as png:
        assert png.format == "PNG" and png.mode == "RGB" and png.size == (w, h)
        assert np.array_equal(np.asarray(png), image.permute(1, 2, 0).numpy())
    assert torch.equal(torch.from_numpy(read_rgb(tmp_path / "a.png")).permute(2, 0, 1), image)


def test_bad_images_are_named(tmp_path):
    for bad in (torch.zeros(4, 5, 5, dtype=torch.uint8), torch.zeros(3, 5, 5), torch.zeros(5, 5, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="save_png: image must be"):
            save_png(bad, tmp_path / "x.png")
