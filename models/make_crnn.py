"""Make digits_crnn.onnx, a small CRNN text recognizer with a bidirectional LSTM, trained
deterministically (seed 0) on scikit-learn's 8x8 digits set side by side in fives.

    python models/make_crnn.py

The network: two Conv+BatchNorm+ReLU, a Conv over the full height, a bidirectional LSTM
along the width, a Linear to 11 classes (10 digits and the CTC blank); output
log-probabilities [time, batch, 11], decoded greedily. crnn_calib.npz holds 128 training
strings for calibration; crnn_eval.npz 300 strings made only of held-out digits, and
crnn_eval_labels.npy their labels ([300, 5]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 0
DIGITS = 5  # per string
HIDDEN = 48


def strings(images: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator):
    """`count` images of DIGITS random digits side by side ([count, 1, 8, 8·DIGITS]) and their labels."""
    picks = rng.integers(0, len(images), size=(count, DIGITS))
    x = np.concatenate([images[picks[:, i]] for i in range(DIGITS)], axis=-1)
    return x.astype(np.float32), labels[picks]


def greedy_decode(log_probs: np.ndarray) -> list[list[int]]:
    """[time, batch, classes] → per string, the classes after collapsing repeats and blanks (0)."""
    best = log_probs.argmax(-1).T
    decoded = []
    for row in best:
        out, previous = [], 0
        for c in row:
            if c != previous and c != 0:
                out.append(int(c) - 1)
            previous = c
        decoded.append(out)
    return decoded


def string_accuracy(log_probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(share of strings read exactly, share of characters right where the length is right)."""
    decoded = greedy_decode(log_probs)
    exact = np.mean([d == list(l) for d, l in zip(decoded, labels)])
    chars = np.mean([np.mean(np.array(d) == l) if len(d) == len(l) else 0.0 for d, l in zip(decoded, labels)])
    return float(exact), float(chars)


def build():
    from torch import nn

    class Crnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 64, (8, 1)), nn.ReLU(),
            )
            self.lstm = nn.LSTM(64, HIDDEN, bidirectional=True)
            self.head = nn.Linear(2 * HIDDEN, 11)

        def forward(self, image):
            x = self.features(image).squeeze(2).permute(2, 0, 1)  # [width, batch, 64]
            y, _ = self.lstm(x)
            return self.head(y).log_softmax(-1)

    return Crnn()


def main() -> None:
    import torch

    from make_models import digits_split

    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    x_train, x_eval, y_train, y_eval = digits_split()
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    ctc = torch.nn.CTCLoss(blank=0)
    for epoch in range(25):
        x, y = strings(x_train[:, 0], y_train, 4096, rng)
        model.train()
        for start in range(0, len(x), 64):
            images = torch.from_numpy(x[start : start + 64, None])
            targets = torch.from_numpy(y[start : start + 64] + 1).long()
            log_probs = model(images)
            lengths = torch.full((len(images),), log_probs.shape[0], dtype=torch.long)
            loss = ctc(log_probs, targets, lengths, torch.full((len(images),), DIGITS, dtype=torch.long))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    calib_x, _ = strings(x_train[:, 0], y_train, 128, rng)
    eval_x, eval_y = strings(x_eval[:, 0], y_eval, 300, rng)
    with torch.no_grad():
        exact, chars = string_accuracy(model(torch.from_numpy(eval_x[:, None])).numpy(), eval_y)
    print(f"held-out strings read exactly: {exact:.1%}, characters: {chars:.1%}")
    torch.onnx.export(model, (torch.from_numpy(eval_x[:2, None]),), str(HERE / "digits_crnn.onnx"), dynamo=False,
                      input_names=["image"], output_names=["log_probs"], opset_version=14,
                      dynamic_axes={"image": {0: "batch"}, "log_probs": {1: "batch"}})
    np.savez(HERE / "crnn_calib.npz", image=calib_x[:, None])
    np.savez(HERE / "crnn_eval.npz", image=eval_x[:, None])
    np.save(HERE / "crnn_eval_labels.npy", eval_y)


if __name__ == "__main__":
    main()
