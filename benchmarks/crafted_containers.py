"""Peak memory of `onnxcomp unpack` and `onnxcomp.InferenceSession` on crafted containers
(tables that lie, with their checksums recomputed), against the container's own size.

    python benchmarks/crafted_containers.py [--model build/zoo/minilm/minilm.onnx]

The container is the model at 4 bits; each crafted variant is opened in a fresh process,
whose VmHWM is read at the end. The fixed part is a process that imports onnxcomp and
opens a valid container of the digits CNN (the interpreter and libraries themselves).
Prints one row per kind: outcome, peak MB, peak above the fixed part, and that excess over
the container's size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from crafted import CRAFTED, craft, join, split  # noqa: E402

PROBE = """
import sys, onnxcomp
from onnxcomp.errors import OnnxcompError
outcome = "decoded"
try:
    if sys.argv[1] == "session":
        onnxcomp.InferenceSession(sys.argv[2])
    else:
        from onnxcomp.container.files import unpack_file
        unpack_file(sys.argv[2], sys.argv[3])
except OnnxcompError as err:
    outcome = "refused: " + str(err).split(": ", 1)[-1][:60]
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(outcome + "\\t" + str(peak))
"""


def probe(mode: str, container: Path, out: Path) -> tuple[str, float]:
    result = subprocess.run([sys.executable, "-c", PROBE, mode, str(container), str(out)], capture_output=True, text=True,
                            check=True)
    outcome, peak = result.stdout.strip().rsplit("\t", 1)
    return outcome, float(peak)


def skeleton_bomb(blob: bytes) -> bytes:
    toc, sections = split(blob)
    skeleton = next(s for s in toc["sections"] if s["kind"] == "skeleton")
    start = sum(s["length"] for s in toc["sections"][: toc["sections"].index(skeleton)])
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (1 << 30))
    sections = sections[:start] + bomb + sections[start + skeleton["length"] :]
    skeleton.update(length=len(bomb), crc32=zlib.crc32(bomb))
    return join(zstandard.ZstdCompressor().compress(json.dumps(toc).encode()), sections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "build" / "zoo" / "minilm" / "minilm.onnx")
    args = parser.parse_args()
    from onnxcomp import QuantConfig, compress_file
    from onnxcomp.container.files import pack_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        compress_file(args.model, tmp / "q4.onnx", QuantConfig(bits=4))
        pack_file(tmp / "q4.onnx", tmp / "valid.onnxc")
        compress_file(ROOT / "models" / "digits_cnn.onnx", tmp / "d.onnx", QuantConfig(bits=4))
        pack_file(tmp / "d.onnx", tmp / "small.onnxc")
        valid = (tmp / "valid.onnxc").read_bytes()
        kinds = {"valid container": valid, "skeleton expands to 1 GiB": skeleton_bomb(valid),
                 "table expands to 64 MiB+": join(zstandard.ZstdCompressor(level=19).compress(b" " * ((1 << 26) + 10)), b""),
                 **{name: craft(valid, mutate) for name, mutate in sorted(CRAFTED.items())}}
        fixed = {mode: probe(mode, tmp / "small.onnxc", tmp / "o" / "d.onnx")[1] for mode in ("session", "unpack")}
        print(f"container: {len(valid) / 2**20:.1f} MiB ({args.model.name} at 4 bits); fixed part: "
              f"session {fixed['session']:.0f} MiB, unpack {fixed['unpack']:.0f} MiB")
        print(f"{'crafted':30} {'mode':8} {'peak MiB':>9} {'above fixed':>11} {'x container':>11}  outcome")
        for name, blob in kinds.items():
            path = tmp / "c.onnxc"
            path.write_bytes(blob)
            for mode in ("unpack", "session"):
                out = tmp / "out"
                out.mkdir(exist_ok=True)
                outcome, peak = probe(mode, path, out / "m.onnx")
                excess = peak - fixed[mode]
                print(f"{name:30} {mode:8} {peak:9.0f} {excess:11.0f} {excess * 2**20 / len(blob):11.2f}  {outcome}")
                for leftover in out.iterdir():
                    leftover.unlink()


if __name__ == "__main__":
    main()
