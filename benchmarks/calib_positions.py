"""Conv Gram matrices from a capped number of output positions per sample (--calib-positions):
calibration time against the cap, and the estimate's error against the full Gram matrix.

    python benchmarks/calib_positions.py

Two cases: a four-layer Conv model on 1024x1024 images (natural photographs from
scikit-image resized, 8 samples), and EfficientNet-Lite0 from the zoo on its 140
calibration images (224x224). Per cap: seconds for the statistics of every layer (one
onnxruntime pass, the Gram accumulation), and over the layers the relative error
‖H_cap/n_cap − H/n‖_F / ‖H/n‖_F of the per-row Gram matrix, median and largest.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]

CAPS = (0, 16384, 4096, 1024)

LARGE = """
<ir_version: 8, opset_import: ["" : 17]>
detector (float[N, 3, H, W] image) => (float[N, 32, A, B] features) {
    a = Conv<pads = [1, 1, 1, 1], strides = [2, 2]>(image, w1)
    b = Relu(a)
    c = Conv<pads = [1, 1, 1, 1]>(b, w2)
    d = Relu(c)
    e = Conv<pads = [1, 1, 1, 1], strides = [2, 2]>(d, w3)
    f = Relu(e)
    features = Conv(f, w4)
}
"""


def large_case(tmp: Path):
    import graphs
    import onnx
    import skimage
    from PIL import Image

    model = graphs.parsed(LARGE, {"w1": (16, 3, 3, 3), "w2": (16, 16, 3, 3), "w3": (32, 16, 3, 3), "w4": (32, 32, 1, 1)})
    onnx.save(model, tmp / "large.onnx")
    folder = Path(skimage.__file__).parent / "data"
    images = []
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg",
                 "brick.png", "grass.png"):
        with Image.open(folder / name) as image:
            pixels = np.asarray(image.convert("RGB").resize((1024, 1024), Image.BILINEAR), dtype=np.float32) / 255
        images.append(pixels.transpose(2, 0, 1))
    np.savez(tmp / "large.npz", image=np.stack(images))
    return tmp / "large.onnx", tmp / "large.npz", 2


def statistics(model_path: Path, calib: Path, cap: int, batch: int):
    from onnxcomp.calibration.collect import collect
    from onnxcomp.calibration.sources import CalibOptions, open_calibration
    from onnxcomp.feeds import index_bounds, input_specs
    from onnxcomp.layers import find_weight_layers
    from onnxcomp.modelio import load_model
    from onnxcomp.passes.fold_bn import FoldBatchNormPass
    from onnxcomp.passes.normalize import NormalizePass
    from onnxcomp.report import Report

    model = load_model(model_path)
    for pass_ in (NormalizePass(13, Report()), FoldBatchNormPass(Report())):
        pass_(model)
    layers = [l for l in find_weight_layers(model.graph) if l.node.op_type == "Conv"]
    dataset = open_calibration(str(calib), input_specs(model), index_bounds(model),
                               CalibOptions(samples=1024, batch=batch, positions=cap))
    start = time.perf_counter()
    stats = collect(model, dataset, layers)
    seconds = time.perf_counter() - start
    grams = {layer.name: stats.layers[layer].gram for layer in layers if layer in stats.layers}
    return seconds, {name: g.matrix / max(g.rows, 1) for name, g in grams.items()}


def report(title: str, model: Path, calib: Path, batch: int) -> None:
    print(f"\n{title}")
    print(f"{'cap':>8} {'seconds':>8} {'x full':>7} {'median err':>11} {'max err':>8}")
    full_seconds, full = statistics(model, calib, 0, batch)
    print(f"{'all':>8} {full_seconds:8.2f} {1.0:7.2f} {0.0:11.4f} {0.0:8.4f}")
    for cap in CAPS[1:]:
        seconds, grams = statistics(model, calib, cap, batch)
        errors = [np.linalg.norm(grams[n] - full[n]) / np.linalg.norm(full[n]) for n in full]
        print(f"{cap:8d} {seconds:8.2f} {seconds / full_seconds:7.2f} {np.median(errors):11.4f} {max(errors):8.4f}")


def main() -> None:
    import tempfile

    import zoo

    with tempfile.TemporaryDirectory() as tmp:
        model, calib, batch = large_case(Path(tmp))
        report("Conv model, 8 photographs at 1024x1024 (output positions per sample: 262,144 in the first layer)",
               model, calib, batch)
    efficientnet = zoo.ensure("efficientnet")
    report("EfficientNet-Lite0, 140 calibration images at 224x224 (12,544 positions in the first layers)",
           efficientnet.path, efficientnet.calib, 16)


if __name__ == "__main__":
    main()
