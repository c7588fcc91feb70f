"""Evaluates a tandem-trained cnn or mlp in PyTorch (Python), from its model.pt.

Usage: eval_state_dict.py MODEL.pt {cnn|mlp} DATA_DIR VAL_LIMIT
Prints the accuracy on the first VAL_LIMIT Fashion-MNIST test images (all
when 0), normalised as tandem does ((x/255 - 0.2860) / 0.3530). The
architectures restate tandem's (src/models/models.cpp) with the same
parameter names, so load_state_dict(strict=True) checks every key and shape.
"""
import gzip
import struct
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


class Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack(">I", data[:4])[0]
    dims = [struct.unpack(">I", data[4 + 4 * i:8 + 4 * i])[0] for i in range(magic & 0xFF)]
    offset = 4 + 4 * len(dims)
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).reshape(dims)


def main():
    path, arch, data_dir, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    model = Cnn() if arch == "cnn" else Mlp()
    state = torch.load(path)
    model.load_state_dict(state, strict=True)
    model.eval()
    images = read_idx(data_dir + "/t10k-images-idx3-ubyte.gz")
    labels = read_idx(data_dir + "/t10k-labels-idx1-ubyte.gz").long()
    if limit > 0:
        images, labels = images[:limit], labels[:limit]
    x = ((images.float() / 255.0) - 0.2860) / 0.3530
    with torch.no_grad():
        correct = 0
        for i in range(0, len(x), 500):
            logits = model(x[i:i + 500].unsqueeze(1))
            correct += (logits.argmax(1) == labels[i:i + 500]).sum().item()
    print("accuracy %.10f" % (correct / len(x)))


if __name__ == "__main__":
    main()
