"""Reference outputs of the reference protocol's image preprocessing for the
CPU test of `ops::image` (src/ops/image/mod.rs): resize (bilinear) to an
intermediate size, center crop, per-channel normalization.

    PYTHONPATH=/tmp/torchdeps python3 scripts/make_image_reference.py

Writes tests/data/image_crop_reference.safetensors, for each case NAME:
  NAME.src    uint8 [batch, channels, h, w]   seeded random pixels
  NAME.out    float32 [batch, channels, crop, crop]
              = normalize(center_crop(F.interpolate(src / 255, size=resize,
                mode="bilinear", align_corners=False), crop), mean, std)
  NAME.geom   int64 [resize, crop]
The crop is torchvision's own `center_crop` (its offset rounds a half to the
even neighbour). Mean and std are ImageNet's. Cases: the reference protocol
(32 px CIFAR image, 256, then 224; one image, one channel to keep the file
small), an odd margin whose half rounds down (9x7 image, 20, then 15) and
one whose half rounds up (8x8, 23, then 16), both with three channels.
"""
import os

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "image_crop_reference.safetensors")
MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])
CASES = [("cifar", 1, 1, 32, 32, 256, 224), ("odd_down", 2, 3, 9, 7, 20, 15), ("odd_up", 1, 3, 8, 8, 23, 16)]


def main():
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, batch, channels, h, w, resize, crop in CASES:
        src = torch.randint(0, 256, (batch, channels, h, w), generator=g, dtype=torch.uint8)
        x = F.interpolate(src.double() / 255.0, size=(resize, resize), mode="bilinear", align_corners=False)
        x = TF.center_crop(x, [crop, crop])
        mean = MEAN[:channels].double().view(1, -1, 1, 1)
        std = STD[:channels].double().view(1, -1, 1, 1)
        tensors[f"{name}.src"] = src
        tensors[f"{name}.out"] = ((x - mean) / std).float().contiguous()
        tensors[f"{name}.geom"] = torch.tensor([resize, crop], dtype=torch.int64)
    save_file(tensors, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
