"""``sealedtorch demo``: seal a ResNet-50, load it back, prove the round trip.

This is the foundation-stage demo: it exercises the file format end to end on a real
architecture (torchvision ResNet-50 with seeded random weights, since pretrained weights
cannot be downloaded everywhere) and asserts bit-identical outputs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def run_demo(args: argparse.Namespace) -> int:
    import torch
    import torchvision

    from .format import load_model, seal
    from .keys import ModelKey, write_key_file

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="sealedtorch-demo-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        print("1. building torchvision ResNet-50 with seeded random weights")
        model = torchvision.models.resnet50().eval()
        plain = work / "resnet50.pt"
        torch.save(model.state_dict(), plain)

        key = ModelKey.generate("resnet50")
        key_path = write_key_file(work / "resnet50.key", key)
        t0 = time.perf_counter()
        sealed = seal(model, work / "resnet50.sealed", key=key,
                      metadata={"arch": "torchvision.models:resnet50"}, overwrite=True)
        t_seal = time.perf_counter() - t0
        r = sealed.result
        print(f"2. sealed {r.tensor_count} tensors, {r.data_length / 1e6:.1f} MB, into "
              f"{r.path.name} in {t_seal * 1e3:.0f} ms (key: {key_path.name}, mode 0600)")

        def median_load(fn: object, rounds: int = 5) -> float:
            times = []
            for _ in range(rounds):
                t = time.perf_counter()
                fn()  # type: ignore[operator]
                times.append(time.perf_counter() - t)
            return statistics.median(times)

        t_plain = median_load(lambda: torch.load(plain, weights_only=True))
        t_sealed = median_load(lambda: load_model(r.path, torchvision.models.resnet50(),
                                                  key=key))
        print(f"3. load: torch.load {t_plain * 1e3:.0f} ms, sealed {t_sealed * 1e3:.0f} ms "
              f"(ratio {t_sealed / t_plain:.2f}; sealed includes building the module)")

        restored = load_model(r.path, torchvision.models.resnet50(), key=key).eval()
        x = torch.randn(2, 3, 224, 224)
        with torch.inference_mode():
            same = torch.equal(model(x), restored(x))
        assert same, "sealed model's logits differ from the plaintext model's"
        print("4. logits of the decrypted model are bit-identical to the plaintext model's")

        blob = r.path.read_bytes()
        needle = model.state_dict()["fc.weight"].numpy().tobytes()[:64]
        assert needle not in blob, "plaintext weights found in the sealed file"
        print("5. the sealed file contains no plaintext weight bytes; tensor names and the "
              "architecture are encrypted too")
    print("demo OK")
    return 0
