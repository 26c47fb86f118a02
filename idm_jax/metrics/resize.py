"""Integer Lanczos upscaling for metrics that need a minimum image size (NIQE's blocks, dlib's
face detector and descriptor on small faces)."""

import numpy as np
from PIL import Image


def upscale_lanczos(img: np.ndarray, factor: int) -> np.ndarray:
  """Lanczos upscale of uint8 RGB by an integer factor (the image itself for factor 1)."""
  if factor == 1:
    return img
  h, w = img.shape[:2]
  return np.asarray(Image.fromarray(img).resize((w * factor, h * factor), Image.LANCZOS))


def factor_to_reach(size: int, minimum: int) -> int:
  """The smallest integer factor that brings `size` px to at least `minimum` px."""
  return max(1, -(-int(minimum) // int(size)))
