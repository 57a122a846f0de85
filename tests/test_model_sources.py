"""timm and Hugging Face models (issue 22): tiny random timm ViTs (register tokens, a distillation
token, patch 8/16/32, input 32 and 224) in a temporary Hugging Face cache, and tiny transformers
ViT/DeiT folders, loaded with the network disabled; each fine-tuned, exported in fp32, fp16 and
INT8, benchmarked, predicted, served and explained; published models (and a torchvision state
dict trained elsewhere) exported as they are; and the bad inputs, one `error:` line each."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, run_cli
from tests.model_sources import LABELS, TIMM_ARGS, hf_folder, timm_cache
from vitdeploy.errors import VitDeployError

pytest.importorskip("timm")
pytest.importorskip("transformers")

OFFLINE = {"PYTHONPATH": f"{REPO / 'tests' / 'offline'}{os.pathsep}{REPO}", "HF_HUB_OFFLINE": "1"}
REG, DISTILLED, P32 = TIMM_ARGS  # the three timm test models, by name
FINE_TUNED = (REG, DISTILLED, "vit", "deit", "deit-teacher")
GRID = {REG: 4, DISTILLED: 2, "vit": 4, "deit": 4, "deit-teacher": 4}  # 32 px over patch 8 or 16


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Hugging Face cache of the timm models and the transformers folders, as HF_HOME for the
    whole module; the network is off in this process (loopback only) while it runs."""
    home = tmp_path_factory.mktemp("hf_home")
    for name in TIMM_ARGS:
        timm_cache(home, name)
    for kind in ("vit", "deit", "deit-teacher"):
        hf_folder(home / kind, kind)
    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_OFFLINE", "HF_HUB_CACHE")}
    os.environ.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    os.environ.pop("HF_HUB_CACHE", None)
    connect = socket.socket.connect

    def loopback_only(self: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else str(address)
        if not (str(host).startswith("127.") or host in ("localhost", "::1")):
            raise OSError(f"network disabled in this test (tried {host})")
        connect(self, address)

    socket.socket.connect = loopback_only  # type: ignore[method-assign]
    yield home
    socket.socket.connect = connect  # type: ignore[method-assign]
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def png(image: np.ndarray) -> bytes:
    """A CHW uint8 image as PNG bytes."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def source_name(hf_home: Path, which: str) -> str:
    return f"timm:{which}" if which in TIMM_ARGS else f"hf:{hf_home / which}"


# -- specs: what a name means, read from local files ------------------------------------------


@pytest.mark.parametrize("which,size,patch,prefix,readout", [
    (REG, 32, 8, 3, 1), (DISTILLED, 32, 16, 2, 2), (P32, 224, 32, 1, 1),
    ("vit", 32, 8, 1, 1), ("deit", 32, 8, 2, 1), ("deit-teacher", 32, 8, 2, 2),
])
def test_specs_come_from_the_local_files(hf_home: Path, which: str, size: int, patch: int, prefix: int, readout: int) -> None:
    from vitdeploy.models import ModelSpec, build_model, get_spec, load_pretrained

    spec = get_spec(source_name(hf_home, which))
    assert (spec.input_size, spec.patch_size, spec.prefix_tokens, spec.readout_tokens) == (size, patch, prefix, readout)
    assert spec.labels == tuple(LABELS) and spec.num_layers == 2 and spec.family == "finetune"
    assert spec.interpolation == "bicubic" and spec.mean == (0.5, 0.5, 0.5)
    assert spec.crop_fraction == (0.875 if which in TIMM_ARGS else None)
    assert ModelSpec.from_record(spec.to_record(), "test") == spec
    model = build_model(spec, 10)
    report = load_pretrained(model, spec)
    assert report.initialized and all(spec.is_head(k) for k in report.initialized)  # a new 10-class head only
    layers = {spec.layer_id(n) for n, _ in model.named_parameters()}
    assert layers == {0, 1, 2, 3}  # embeddings, the two blocks, the head and final norm: layer decay sees the blocks


def test_a_damaged_model_description_in_a_checkpoint_is_refused(hf_home: Path) -> None:
    from vitdeploy.models import ModelSpec, get_spec

    record = get_spec(f"timm:{REG}").to_record()
    for bad in ({**record, "num_layers": -1}, {**record, "block_pattern": "("}, {k: v for k, v in record.items() if k != "build"},
                {**record, "mean": "x"}, "not a dict"):
        with pytest.raises(VitDeployError, match="damaged model description"):
            ModelSpec.from_record(bad, "ckpt.pt")


# -- fine-tune, export in three precisions, bench, predict, explain ----------------------------


@pytest.fixture(scope="module")
def runs(hf_home: Path, cifar_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each source fine-tuned for 2 steps on the small CIFAR set, then exported (fp32, fp16, INT8; on 50 test
    images one changed answer is 2 points, so the INT8 gate here allows two)."""
    from vitdeploy.export.artifacts import ExportOptions, export_artifacts
    from vitdeploy.export.int8 import Int8Options
    from vitdeploy.train import TrainConfig, run_training

    root = tmp_path_factory.mktemp("sources")
    found = {}
    for which in FINE_TUNED:
        run = root / which / "run"
        config = TrainConfig.from_options(source_name(hf_home, which), data_dir=str(cifar_root), out=str(run), epochs=1,
                                          batch_size=16, val_size=40, device="cpu", max_steps=2)
        run_training(config)
        export_artifacts(ExportOptions(source=run, out=root / which / "art", fp16=True, int8=True, max_batch=16,
                                       data_dir=cifar_root, int8_options=Int8Options(calib_images=32),
                                       int8_max_accuracy_drop=4.0),
                         say=lambda _line: None)
        found[which] = root / which
    return found


@pytest.mark.parametrize("which", FINE_TUNED)
def test_fine_tuned_models_export_in_three_precisions(runs: dict[str, Path], which: str) -> None:
    from vitdeploy.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(runs[which] / "run" / "best.pt")
    assert checkpoint["model_source"]["source"] == ("timm" if which in TIMM_ARGS else "hf")
    assert checkpoint["preprocessing"]["resize_mode"] == "bicubic" and checkpoint["class_names"][0] == "airplane"
    manifest = json.loads((runs[which] / "art" / "manifest.json").read_text())
    by_file = {a["path"]: a for a in manifest["artifacts"]}
    assert set(by_file) == {"model.onnx", "model_fp16.onnx", "model_int8_cpu.onnx", "model_int8_trt.onnx"}
    assert all(a["status"] == "passed" for a in by_file.values())
    assert by_file["model.onnx"]["parity"]["max_abs_logit_diff"] < 1e-4
    assert by_file["model.onnx"]["parity"]["accuracy_pct"] is not None  # CIFAR-10's classes: accuracy is measured
    for name in ("model.onnx", "model_fp16.onnx", "model_int8_trt.onnx"):
        assert by_file[name]["tensorrt_preflight"]["ok"], by_file[name]["tensorrt_preflight"]["problems"]


@pytest.mark.parametrize("which", FINE_TUNED)
def test_each_fine_tuned_model_predicts_serves_and_explains(runs: dict[str, Path], cifar_root: Path, which: str) -> None:
    from tests.conftest import serve_client
    from vitdeploy.backends.ort import OrtBackend
    from vitdeploy.data import load_test
    from vitdeploy.explain import Tokens, explain_images, load_explained_model

    art = runs[which] / "art"
    images = load_test(cifar_root).images[:4].numpy()
    loaded = load_explained_model(art)
    with OrtBackend(art / "model_int8_trt.onnx", "cpu", precision="int8") as backend:
        int8 = backend.infer(images)
    with torch.no_grad():
        from vitdeploy.preprocess import Preprocess

        reference = loaded.module(Preprocess(loaded.preprocessing)(torch.from_numpy(images))).numpy()
    assert np.abs(int8 - reference).max() < 0.1
    records, maps = explain_images(loaded.module, loaded.preprocessing, loaded.class_names, images, "rollout",
                                   tokens=Tokens.of(loaded.spec))
    assert maps.shape == (4, GRID[which], GRID[which]) and records[0]["grid"] == [GRID[which]] * 2
    with serve_client(artifacts=art, backend="ort-cpu", max_batch=16) as client:
        answer = client.post("/v1/predict", files={"file": ("a.png", png(images[0]), "image/png")})
        assert answer.status_code == 200, answer.text
        top = answer.json()["predictions"][0]
        assert top["label"] == loaded.class_names[int(reference[0].argmax())]


def test_bench_predict_and_explain_a_fine_tuned_timm_model(runs: dict[str, Path], cifar_root: Path, tmp_path: Path) -> None:
    from PIL import Image

    art = runs[DISTILLED] / "art"
    result = run_cli("bench", str(art), "--backend", "pytorch,ort-cpu", "--batch-sizes", "1", "--data-dir", str(cifar_root),
                     "--out", str(tmp_path), "--warmup", "0", "--min-iters", "1", "--min-seconds", "0", "--max-seconds", "1",
                     env=OFFLINE)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    parity = {(p["backend"], p["precision"]): p for p in report["parity"]}
    assert parity[("ort-cpu", "fp32")]["passed"] and parity[("ort-cpu", "int8")]["passed"]
    assert parity[("ort-cpu", "fp32")]["accuracy_pct"] == parity[("pytorch", "fp32")]["accuracy_pct"]
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    predicted = run_cli("predict", str(art), str(tmp_path / "a.png"), "--json", env=OFFLINE)
    assert predicted.returncode == 0, predicted.stderr
    assert len(json.loads(predicted.stdout)[0]["predictions"]) == 5
    explained = run_cli("explain", str(art), str(tmp_path / "a.png"), "--out", str(tmp_path / "maps"),
                        "--method", "grad-rollout", env=OFFLINE)
    assert explained.returncode == 0, explained.stderr
    record = json.loads((tmp_path / "maps" / "a.json").read_text())
    assert record["grid"] == [2, 2] and record["patch_size"] == 16  # 32 px, patch 16: the distillation token is no patch


def test_resume_needs_neither_the_cache_nor_the_folder(hf_home: Path, cifar_root: Path, tmp_path: Path) -> None:
    import shutil

    from vitdeploy.checkpoint import load_checkpoint
    from vitdeploy.train import TrainConfig, run_training
    from vitdeploy.train.start import plan_start

    folder = hf_folder(tmp_path / "moved-away", "vit")
    config = TrainConfig.from_options(f"hf:{folder}", data_dir=str(cifar_root), out=str(tmp_path / "run"), epochs=1,
                                      batch_size=16, val_size=40, device="cpu", max_steps=2)
    run_training(config)
    shutil.rmtree(folder)
    start = plan_start({"out": None, "max_steps": 4}, tmp_path / "run")
    run_training(start.config, resume=start.checkpoint)
    assert load_checkpoint(tmp_path / "run")["step"] == 4


# -- attention maps: the model's own attention, prefix tokens dropped ---------------------------


def test_timm_hooks_equal_its_eager_attention_and_keep_the_logits(hf_home: Path) -> None:
    from vitdeploy.explain import AttentionHooks, Tokens, explain_batch, rollout
    from vitdeploy.models import build_model, get_spec, load_pretrained

    spec = get_spec(f"timm:{REG}")
    model = build_model(spec, 3)
    load_pretrained(model, spec)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    own: list[torch.Tensor] = []
    for block in model.blocks:  # timm's own eager path: the probabilities pass attn_drop
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda _m, _a, out: own.append(out.detach()))
    with torch.no_grad():
        plain = model(x)
        own.clear()
        for block in model.blocks:
            block.attn.fused_attn = True  # the fused kernel, as deployed: the hooks recompute it
        with AttentionHooks(model) as hooks:
            hooked = model(x)
        for block in model.blocks:
            block.attn.fused_attn = False
        model(x)
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=1e-5)
    assert len(hooks.attentions) == 2 and hooks.attentions[0].shape == (2, 2, 16 + 3, 16 + 3)
    tokens = Tokens.of(spec)
    torch.testing.assert_close(rollout(hooks.attentions, tokens=tokens), rollout(own, tokens=tokens))
    assert explain_batch(model, x, "grad-rollout", tokens=tokens).maps.shape == (2, 4, 4)  # registers are no patches


@pytest.mark.parametrize("kind", ["vit", "deit-teacher"])
def test_transformers_rollout_is_that_of_its_output_attentions(hf_home: Path, kind: str) -> None:
    from vitdeploy.explain import AttentionHooks, Tokens, explain_batch, rollout
    from vitdeploy.models import build_model, get_spec, load_pretrained

    spec = get_spec(f"hf:{hf_home / kind}")
    model = build_model(spec, 3)
    load_pretrained(model, spec)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    model.hf.set_attn_implementation("eager")
    with torch.no_grad():
        output = model.hf(pixel_values=x, output_attentions=True)
    model.hf.set_attn_implementation("sdpa")
    with torch.no_grad(), AttentionHooks(model) as hooks:
        logits = model(x)
    torch.testing.assert_close(logits, output.logits, atol=1e-5, rtol=1e-5)
    tokens = Tokens.of(spec)
    torch.testing.assert_close(rollout(hooks.attentions, tokens=tokens), rollout(list(output.attentions), tokens=tokens))
    assert model.hf.config._attn_implementation == "sdpa"  # put back after explaining
    assert explain_batch(model, x, "grad-rollout", tokens=tokens).maps.shape == (2, 4, 4)


# -- deployed as published: the model's own classes and preprocessing ---------------------------


@pytest.fixture(scope="module")
def published(hf_home: Path, cifar_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """timm:REG exported as published (no training run), with a Triton repository."""
    root = tmp_path_factory.mktemp("published")
    result = run_cli("export", f"timm:{REG}", "--out", str(root / "art"), "--data-dir", str(cifar_root), "--int8",
                     "--calib-images", "32", "--max-batch", "8", "--triton", str(root / "triton"), env=OFFLINE)
    assert result.returncode == 0, result.stderr + result.stdout
    return root


def test_a_published_timm_model_exports_with_its_own_classes(published: Path) -> None:
    from vitdeploy.models import load_model

    manifest = json.loads((published / "art" / "manifest.json").read_text())
    assert manifest["model"]["class_names"] == LABELS and manifest["model"]["name"] == f"timm:{REG}"
    assert manifest["preprocessing"]["crop_fraction"] == 0.875 and manifest["preprocessing"]["source_size"] == 32
    assert Path(manifest["model"]["source_checkpoint"]["path"]) == (published / "art" / "model.pt").resolve()
    assert manifest["published"]["weights"].endswith("model.safetensors")
    for artifact in manifest["artifacts"]:
        assert artifact["status"] == "passed" and artifact["parity"]["accuracy_pct"] is None  # not CIFAR-10's classes
        assert artifact["parity"]["top1_agreement"] > 0.9
    assert [m["name"] for m in manifest["triton"]["models"]][0] == "timm_vit_tiny_patch16_224.test_reg_onnx"
    loaded = load_model(published / "art" / "model.pt")  # the weights as published: the cached file's, head included
    from safetensors.torch import load_file

    cached = load_file(manifest["published"]["weights"])
    assert all(torch.equal(loaded.module.state_dict()[k], v) for k, v in cached.items())


def test_a_published_model_is_served_over_loopback_with_its_class_names(published: Path) -> None:
    pytest.importorskip("fastapi")
    import httpx

    from tests.test_serve import Server

    image = np.random.default_rng(1).integers(0, 255, (3, 64, 48), dtype=np.uint8)  # not square: cropped as timm does
    server = Server(published / "art", "--backend", "ort-cpu", "--max-batch", "8")
    try:
        response = httpx.post(server.url + "/v1/predict", files={"file": ("x.png", png(image), "image/png")}, timeout=30)
        assert response.status_code == 200, response.text
        assert {p["label"] for p in response.json()["predictions"]} <= set(LABELS)
        explained = httpx.post(server.url + "/v1/explain", files={"file": ("x.png", png(image), "image/png")}, timeout=30)
        assert explained.status_code == 200, explained.text
        assert explained.json()["grid"] == [4, 4]  # 32 px, patch 8; the class token and 2 registers are no patches
    finally:
        assert server.stop() == 0


def test_a_transformers_folder_exports_as_published(hf_home: Path, cifar_root: Path, tmp_path: Path) -> None:
    result = run_cli("export", f"hf:{hf_home / 'deit'}", "--out", str(tmp_path / "art"), "--data-dir", str(cifar_root),
                     "--fp16", env=OFFLINE)
    assert result.returncode == 0, result.stderr + result.stdout
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["model"]["class_names"] == LABELS and all(a["status"] == "passed" for a in manifest["artifacts"])


def test_a_torchvision_state_dict_trained_elsewhere_exports_as_it_is(cifar_root: Path, tmp_path: Path) -> None:
    from vitdeploy.models import build_model, get_spec, load_model

    torch.manual_seed(3)
    model = build_model(get_spec("vit_cifar_tiny"), 4)
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)
    torch.save(model.state_dict(), tmp_path / "elsewhere.pt")
    (tmp_path / "names.txt").write_text("cat\ndog\n\nfish\nbird\n")
    result = run_cli("export", "vit_cifar_tiny", "--weights", str(tmp_path / "elsewhere.pt"), "--class-names",
                     str(tmp_path / "names.txt"), "--out", str(tmp_path / "art"), "--data-dir", str(cifar_root), env=OFFLINE)
    assert result.returncode == 0, result.stderr + result.stdout
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["model"]["class_names"] == ["cat", "dog", "fish", "bird"]
    loaded = load_model(tmp_path / "art" / "model.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model.eval()(x))


def test_bicubic_resize_is_named_by_the_preflight_and_resize_bilinear_measures_its_cost(
        hf_home: Path, cifar_root: Path, tmp_path: Path) -> None:
    from vitdeploy.export.artifacts import ExportOptions, export_artifacts
    from vitdeploy.train import TrainConfig, run_training

    run = tmp_path / "run"  # 224 px, patch 32, fine-tuned on 32 px images: the graph resizes 32 -> 224, bicubic
    run_training(TrainConfig.from_options(f"timm:{P32}", data_dir=str(cifar_root), out=str(run), epochs=1, batch_size=16,
                                          val_size=40, device="cpu", max_steps=1))
    bicubic = export_artifacts(ExportOptions(source=run, out=tmp_path / "a", max_batch=4, data_dir=cifar_root,
                                             parity_images=16), say=lambda _line: None)
    check = bicubic["artifacts"][0]["tensorrt_preflight"]
    assert not check["ok"] and "--resize bilinear" in check["problems"][0]
    bilinear = export_artifacts(ExportOptions(source=run, out=tmp_path / "b", max_batch=4, data_dir=cifar_root,
                                              parity_images=16, resize="bilinear"), say=lambda _line: None)
    assert bilinear["artifacts"][0]["tensorrt_preflight"]["ok"] and bilinear["artifacts"][0]["status"] == "passed"
    cost = bilinear["resize"]
    assert (cost["model"], cost["graph"]) == ("bicubic", "bilinear") and bilinear["preprocessing"]["resize_mode"] == "bilinear"
    assert 0 < cost["cost"]["max_abs_logit_diff"] and cost["cost"]["images"] == 16


# -- bad input: one error line each --------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(hf_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad")

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, root / "evil.pt")
    (root / "no-config").mkdir()
    (root / "no-config" / "model.safetensors").write_bytes(b"")
    return root


@pytest.mark.parametrize("args,message", [
    (["timm:vit_nonexistent_patch16"], "timm has no model 'vit_nonexistent_patch16'"),
    (["timm:resnet50"], "is a ResNet, not one of timm's Vision Transformers"),
    (["hf:{bad}/no-config"], "has no config.json"),
    (["timm:" + REG, "--weights", "{home}/hub/models--timm--" + P32 + "/snapshots/0123456789abcdef0123456789abcdef01234567/model.safetensors"],
     "mis-shaped tensors (e.g. patch_embed.proj.weight"),
    (["vit_cifar_tiny", "--weights", "{bad}/evil.pt"], "could run code"),
    (["timm:vit_small_patch16_224.augreg_in21k"], "no local weights for timm:vit_small_patch16_224.augreg_in21k: looked for "
                                                  "model.safetensors in"),
    (["hf:acme/not-cached"], "no cached copy of it in"),
])
def test_bad_sources_are_one_error_line(hf_home: Path, bad_files: Path, tmp_path: Path, args: list[str], message: str) -> None:
    args = [a.format(bad=bad_files, home=hf_home) for a in args]
    result = run_cli("export", *args, "--out", str(tmp_path / "out"), env=OFFLINE)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "pwned" not in result.stdout and not (tmp_path / "out").exists()
    if "no local weights" in message:
        assert "--weights" in lines[0] and str(hf_home / "hub") in lines[0]


@pytest.mark.parametrize("name,package", [("timm:vit_tiny_patch16_224", "timm"), ("hf:some/model", "transformers")])
def test_a_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch, name: str, package: str) -> None:
    import sys

    from vitdeploy.models import get_spec

    monkeypatch.setitem(sys.modules, package, None)  # import fails as if the package were not installed
    extra = "timm" if package == "timm" else "hf"
    with pytest.raises(VitDeployError, match=rf"need the {package} package; install it with pip install 'vitdeploy\[{extra}\]'"):
        get_spec(name)


def test_models_lists_the_other_sources(hf_home: Path) -> None:
    result = run_cli("models", "--source", "timm", "--filter", "*deit_tiny*", "--json", env=OFFLINE)
    assert result.returncode == 0, result.stderr
    names = {r["name"]: r["cached"] for r in json.loads(result.stdout)}
    assert names["timm:deit_tiny_distilled_patch16_224"] is False and names[f"timm:{DISTILLED}"] is True
    assert "timm:resnet50" not in names
    assert run_cli("models", "--source", "hf", env=OFFLINE).returncode == 0


def test_without_labels_the_accuracy_gate_counts_changed_answers() -> None:
    from vitdeploy.parity import Tolerance, compare

    reference = np.eye(10, dtype=np.float32) * 5
    candidate = reference.copy()
    candidate[[0, 1]] = np.roll(candidate[[0, 1]], 1, axis=1)  # 2 of 10 answers change
    strict = compare(reference, candidate, None, Tolerance(None, None, 1.0))
    assert not strict["passed"] and "top-1 changed on 20.00% of the images" in strict["failures"][0]
    assert strict["accuracy_pct"] is None and strict["top1_agreement"] == 0.8
    assert compare(reference, candidate, None, Tolerance(None, None, 20.0))["passed"]


def test_a_hostile_model_description_never_sizes_memory(hf_home: Path) -> None:
    from vitdeploy.models import ModelSpec, build_model, get_spec

    timm_record = get_spec(f"timm:{REG}").to_record()
    huge = {**timm_record, "build": {**timm_record["build"], "model_args": {**timm_record["build"]["model_args"],
                                                                          "embed_dim": 10**9}}}
    with pytest.raises(VitDeployError, match="arguments out of range"):
        build_model(ModelSpec.from_record(huge, "ckpt.pt"), 3)
    deeper = {**timm_record, "build": {**timm_record["build"], "model_args": {**timm_record["build"]["model_args"], "depth": 7}}}
    with pytest.raises(VitDeployError, match="not the 2 blocks it names"):
        build_model(ModelSpec.from_record(deeper, "ckpt.pt"), 3)
    hf_record = get_spec(f"hf:{hf_home / 'vit'}").to_record()
    wider = {**hf_record, "build": {**hf_record["build"], "config": {**hf_record["build"]["config"], "hidden_size": 10**7}}}
    with pytest.raises(VitDeployError, match="does not match its sizes"):
        build_model(ModelSpec.from_record(wider, "ckpt.pt"), 3)
    with pytest.raises(VitDeployError, match="damaged model description"):
        ModelSpec.from_record({**hf_record, "hidden_dim": 10**7}, "ckpt.pt")


def test_a_bare_timm_architecture_finds_its_default_tags_cache(hf_home: Path) -> None:
    from vitdeploy.models import get_spec

    repo = hf_home / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    (repo / "snapshots" / "abc" / "model.safetensors").write_bytes(b"")
    spec = get_spec("timm:vit_tiny_patch16_224")  # as timm's own create_model(pretrained=True) would look it up
    assert Path(spec.pretrained["local"]) == repo / "snapshots" / "abc" / "model.safetensors"
    assert spec.input_size == 224 and spec.crop_fraction == 0.9 and spec.interpolation == "bicubic"
    from vitdeploy.sources import hub_cache

    (repo / "refs" / "main").write_text("..")  # a ref naming the parent folder is never taken as a snapshot
    assert hub_cache.snapshot("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k") == repo / "snapshots" / "abc"  # the only one
    (repo / "snapshots" / "def").mkdir()
    assert hub_cache.snapshot("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k") is None  # two, and no valid ref: neither


def test_a_too_old_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    from vitdeploy import sources

    monkeypatch.setattr(timm, "__version__", "1.0.15")  # cannot build its models on the meta device
    with pytest.raises(VitDeployError, match=r"need timm >= 1.0.24 \(found 1.0.15\)"):
        sources.import_extra("timm")
    assert sources._version("5.0.0rc1") == (5, 0, 0) and sources._version("1.0.31.dev0") == (1, 0, 31)


def test_hostile_model_folders_are_refused_before_building(hf_home: Path, tmp_path: Path) -> None:
    import shutil

    from vitdeploy.models import get_spec

    folder = tmp_path / "deep"
    shutil.copytree(hf_home / "vit", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**6}))
    with pytest.raises(VitDeployError, match="sizes out of range"):
        get_spec(f"hf:{folder}")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(VitDeployError, match="is not a JSON object"):
        get_spec(f"hf:{folder}")
    snapshot = hf_home / "hub" / f"models--timm--{REG}" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    original = (snapshot / "config.json").read_text()
    try:
        timm_config = json.loads(original)
        timm_config["model_args"]["depth"] = 10**6
        (snapshot / "config.json").write_text(json.dumps(timm_config))
        with pytest.raises(VitDeployError, match="out-of-range model_args"):
            get_spec(f"timm:{REG}")
    finally:
        (snapshot / "config.json").write_text(original)


def test_malformed_preprocessing_in_a_model_folder_is_one_error(hf_home: Path, tmp_path: Path) -> None:
    import shutil

    from vitdeploy.models import get_spec

    folder = tmp_path / "bad-mean"
    shutil.copytree(hf_home / "vit", folder)
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    for bad in ({"image_mean": ["x", 1, 2]}, {"image_std": [0.5, 0.5]}, {"image_mean": 7}):
        (folder / "preprocessor_config.json").write_text(json.dumps({**processor, **bad}))
        with pytest.raises(VitDeployError, match="where 3 per-channel numbers belong"):
            get_spec(f"hf:{folder}")
    (folder / "preprocessor_config.json").write_text(json.dumps({**processor, "resample": [3]}))
    assert get_spec(f"hf:{folder}").interpolation == "bicubic"  # an unknown filter code: the bicubic default
    with pytest.raises(VitDeployError, match="there is no folder"):
        get_spec(f"hf:{tmp_path / 'nowhere'}")
