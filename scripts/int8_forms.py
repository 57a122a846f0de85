#!/usr/bin/env python3
"""Which INT8 form ort-cpu should get on this CPU: the dynamic graph (activation scales computed
per batch at run time, so an image's answer depends on the other images in its batch) against
static Q/DQ forms (fixed scales: batch-independent), timed in one run on the same fp32 graph.

    python3 scripts/int8_forms.py ART/model.onnx --data-dir ../shared/data [--calib-images 8] [--json OUT]

For each form (and the fp32 graph itself): latency p50 at batch 1 and 8 (ONNX Runtime CPU, all cores, 20 runs after 3
warm-up runs, forms alternated), and how far one image's logits move when it runs alone
versus inside a batch of 8 (max |dlogit|: 0 for a batch-independent graph up to float noise).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitdeploy.data import load_test  # noqa: E402
from vitdeploy.export import int8 as int8q  # noqa: E402
from vitdeploy.versions import cpu_flags  # noqa: E402

FORMS = ("dynamic", "qdq-u8", "qdq-u8-vnni")


def p50_ms(session, name: str, batch: np.ndarray, runs: int = 20) -> float:  # noqa: ANN001 - an InferenceSession
    for _ in range(3):
        session.run(None, {name: batch})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {name: batch})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--calib-images", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import onnxruntime as ort

    test = load_test(args.data_dir)
    px = int(__import__("onnx").load(str(args.model), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[2].dim_value or 32)
    images = test.images[: args.calib_images].numpy()
    batch8 = test.images[100:108].numpy()
    options = int8q.Int8Options(calib_images=args.calib_images)
    record = {"cpu_flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"}), "forms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {"fp32": ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])}
        record["forms"]["fp32"] = {}
        for form in FORMS:
            out = Path(tmp) / f"{form}.onnx"
            start = time.perf_counter()
            int8q.quantize(args.model, out, form, None if form == "dynamic" else images, options, model_px=px)
            record["forms"][form] = {"quantize_s": round(time.perf_counter() - start, 1)}
            sessions[form] = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        name = sessions["dynamic"].get_inputs()[0].name
        for form, session in sessions.items():
            alone = session.run(None, {name: batch8[:1]})[0][0]
            together = session.run(None, {name: batch8})[0][0]
            record["forms"][form]["batch_dependence_max_abs_dlogit"] = float(np.abs(alone - together).max())
        for size, batch in (("b1", batch8[:1]), ("b8", batch8)):
            for _repeat in range(3):  # alternated: drift hits every form alike
                for form, session in sessions.items():
                    record["forms"][form].setdefault(f"p50_ms_{size}", []).append(round(p50_ms(session, name, batch), 2))
    for form in record["forms"].values():
        for size in ("b1", "b8"):
            form[f"p50_ms_{size}"] = float(np.median(form[f"p50_ms_{size}"]))
    print(json.dumps(record, indent=2))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
