r"""Convert the usual PyTorch weight files for LPIPS and FID into our .npz format.

  # LPIPS (VGG16): torchvision's ImageNet VGG16 (vgg16-397923af.pth) plus LPIPS v0.1's
  # linear layers (lpips/weights/v0.1/vgg.pth from richzhang/PerceptualSimilarity):
  python -m idm_jax.metrics.convert_weights --lpips_vgg vgg16.pth --lpips_lin vgg.pth \
      --out lpips.npz
  # FID: pytorch-fid's FID Inception weights (pt_inception-2015-12-05-6726825d.pth):
  python -m idm_jax.metrics.convert_weights --inception pt_inception-2015-12-05.pth \
      --out inception.npz

Reading .pth files needs torch (not a dependency of idm_jax; install it just for this step).
The mapping itself (`lpips_from_torch`, `inception_from_torch`) works on plain dicts of numpy
arrays, so it is tested without torch. The output is checked against the Flax model before it
is written.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Mapping

import numpy as np

from idm_jax.metrics import npz_weights
from idm_jax.runtime import cli

# torchvision vgg16 `features` indices of the 13 convs, in order (ReLUs and pools in between).
VGG_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def _conv_kernel(w: np.ndarray) -> np.ndarray:
  """PyTorch OIHW -> Flax HWIO."""
  if w.ndim != 4:
    raise ValueError(f'expected a 4-D conv weight, got shape {w.shape}')
  return np.transpose(w, (2, 3, 1, 0))


def lpips_from_torch(
  vgg_sd: Mapping[str, np.ndarray], lin_sd: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
  """torchvision vgg16 + LPIPS lin state dicts -> flat LPIPS variables."""
  from idm_jax.metrics import lpips  # noqa: PLC0415 (keeps --help fast: imports jax)

  names = [name for block in lpips.VGG_SLICES for name, _ in block]
  out = {}
  for name, idx in zip(names, VGG_CONV_INDICES):
    for suffix in ('weight', 'bias'):
      key = f'features.{idx}.{suffix}'
      if key not in vgg_sd:
        raise KeyError(f'VGG16 state dict lacks {key!r}; is this torchvision vgg16?')
    out[f'params/vgg/{name}/kernel'] = _conv_kernel(np.asarray(vgg_sd[f'features.{idx}.weight']))
    out[f'params/vgg/{name}/bias'] = np.asarray(vgg_sd[f'features.{idx}.bias'])
  for i in range(len(lpips.CHANNELS)):
    key = f'lin{i}.model.1.weight'
    if key not in lin_sd:
      raise KeyError(f'LPIPS lin state dict lacks {key!r}; is this LPIPS v0.1 vgg.pth?')
    out[f'params/lin{i}'] = np.asarray(lin_sd[key]).reshape(-1)  # (1, C, 1, 1) -> (C,)
  return out


_BN = {
  'weight': ('params', 'scale'),
  'bias': ('params', 'bias'),
  'running_mean': ('batch_stats', 'mean'),
  'running_var': ('batch_stats', 'var'),
}


def inception_from_torch(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """pytorch-fid FIDInceptionA/C/E state dict -> flat Flax variables (fc is dropped)."""
  out = {}
  for key, value in sd.items():
    value = np.asarray(value)
    if key.startswith('fc.') or key.endswith('num_batches_tracked'):
      continue  # the classifier is not part of pool3 features
    m = re.fullmatch(r'(.+)\.conv\.weight', key)
    if m:
      out['params/' + m.group(1).replace('.', '/') + '/conv/kernel'] = _conv_kernel(value)
      continue
    m = re.fullmatch(r'(.+)\.bn\.(weight|bias|running_mean|running_var)', key)
    if m:
      collection, leaf = _BN[m.group(2)]
      out[f'{collection}/' + m.group(1).replace('.', '/') + f'/bn/{leaf}'] = value
      continue
    raise KeyError(
      f"unexpected key {key!r} in the Inception state dict; is this pytorch-fid's "
      'pt_inception-2015-12-05 file?'
    )
  return out


def _torch_state_dict(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # noqa: PLC0415 (optional: torch)
  except ImportError as e:
    raise SystemExit(
      'convert_weights needs PyTorch to read .pth files (pip install torch); '
      'it is not a dependency of idm_jax otherwise'
    ) from e
  try:
    sd = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises many types for bad files
    raise SystemExit(f'cannot read PyTorch weights {path!r}: {e}') from e
  if not isinstance(sd, Mapping):
    raise SystemExit(f'{path!r} does not hold a state dict (got {type(sd).__name__})')
  sd = sd.get('state_dict', sd)
  return {k.removeprefix('module.'): v.detach().cpu().numpy() for k, v in sd.items()}


def _check_and_save(flat: dict, expected, out: str, what: str) -> None:
  np.savez(out, **{k: v.astype(np.float32) for k, v in flat.items()})
  npz_weights.load_variables(out, expected, what)  # fails loudly on any key/shape mismatch
  print(f'wrote {out} ({len(flat)} arrays)')


def main(argv=None) -> int:
  parser = cli.ArgumentParser(
    description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--lpips_vgg', help='torchvision vgg16 .pth (ImageNet weights)')
  parser.add_argument('--lpips_lin', help='LPIPS v0.1 vgg.pth (linear layers)')
  parser.add_argument('--inception', help="pytorch-fid's pt_inception-2015-12-05-*.pth")
  parser.add_argument('--out', required=True, help='output .npz')
  args = parser.parse_args(argv)
  if bool(args.lpips_vgg) != bool(args.lpips_lin):
    parser.error('--lpips_vgg and --lpips_lin go together')
  if bool(args.lpips_vgg) == bool(args.inception):
    parser.error('give either --lpips_vgg/--lpips_lin or --inception')
  if args.inception:
    from idm_jax.metrics import fid  # noqa: PLC0415 (keeps --help fast: imports jax)

    flat = inception_from_torch(_torch_state_dict(args.inception))
    _check_and_save(flat, fid.abstract_variables(), args.out, 'Inception')
  else:
    from idm_jax.metrics import lpips  # noqa: PLC0415 (keeps --help fast: imports jax)

    flat = lpips_from_torch(_torch_state_dict(args.lpips_vgg), _torch_state_dict(args.lpips_lin))
    _check_and_save(flat, lpips.abstract_variables(), args.out, 'LPIPS')
  return 0


if __name__ == '__main__':
  sys.exit(main())
