"""Attention maps: rollout arithmetic on hand-built attention, hooks that leave the logits
alone, map shapes per model family, `vitdeploy explain` and `POST /v1/explain`."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.vision_transformer import VisionTransformer

from tests.conftest import run_cli, serve_client
from vitdeploy.data import load_test
from vitdeploy.explain import (
    AttentionHooks,
    explain_batch,
    explain_images,
    grad_rollout,
    load_explained_model,
    rollout,
)
from vitdeploy.models import build_model, get_spec
from vitdeploy.serve.explainer import ExplainBusy, Explainer


def attention(*rows: list[float]) -> torch.Tensor:
    """One image, one head: 1 x 1 x T x T."""
    return torch.tensor([list(rows)], dtype=torch.float32).unsqueeze(1)


# Tokens: class, patch 1, patch 2. Layer 1: patch 1 reads patch 2; layer 2: the class token reads patch 1.
LAYER1 = attention([1, 0, 0], [0, 0, 1], [0, 0, 1])
LAYER2 = attention([0, 1, 0], [0, 1, 0], [0, 0, 1])


def test_rollout_follows_attention_through_the_layers() -> None:
    """(A + I) / 2 per layer, multiplied in layer order: the class token's half-share of
    patch 1 in layer 2 splits equally between patches 1 and 2 through layer 1."""
    torch.testing.assert_close(rollout([LAYER1, LAYER2]), torch.tensor([[0.25, 0.25]]))
    torch.testing.assert_close(rollout([LAYER2]), torch.tensor([[0.5, 0.0]]))
    two_heads = torch.cat([LAYER2, attention([0, 0, 1], [0, 1, 0], [0, 0, 1])], dim=1)
    torch.testing.assert_close(rollout([two_heads], "mean"), torch.tensor([[0.25, 0.25]]))
    torch.testing.assert_close(rollout([two_heads], "max"), torch.tensor([[1 / 3, 1 / 3]]))


def test_discard_ratio_drops_the_weakest_entries_but_not_the_class_column() -> None:
    layer = attention([0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.2, 0.4, 0.4])
    # Dropping the weakest third (0.1, 0.2, 0.2): 0.2 of column 0 stays; 0.1 and the row-0 0.2 go.
    kept = attention([0.5, 0.3, 0.0], [0.6, 0.0, 0.3], [0.2, 0.4, 0.4])[0, 0]
    step = (kept + torch.eye(3)) / 2
    step = step / step.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(rollout([layer], discard_ratio=1 / 3), step[None, 0, 1:])


def test_grad_rollout_accumulates_positive_gradient_times_attention() -> None:
    ones = torch.ones_like(LAYER1)
    # R = I + A1 = [[2,0,0],[0,1,1],[0,0,2]]; R + A2 R, row 0: [2,0,0] + [0,1,1].
    torch.testing.assert_close(grad_rollout([LAYER1, LAYER2], [ones, ones]), torch.tensor([[1.0, 1.0]]))
    negative = -ones  # relu(grad * A) = 0: nothing but the identity
    torch.testing.assert_close(grad_rollout([LAYER1, LAYER2], [negative, negative]), torch.tensor([[0.0, 0.0]]))


def small_vit(image: int, patch: int) -> VisionTransformer:
    model = VisionTransformer(image_size=image, patch_size=patch, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at zero
    return model.eval()


@pytest.mark.parametrize("image,patch,grid", [(32, 4, 8), (224, 16, 14), (224, 14, 16), (224, 32, 7)])
def test_hooks_keep_the_logits_and_maps_have_the_patch_grid(image: int, patch: int, grid: int) -> None:
    model = small_vit(image, patch)
    x = torch.randn(2, 3, image, image)
    with torch.no_grad():
        plain = model(x)
        with AttentionHooks(model) as hooks:
            hooked = model(x)
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=1e-5)
    assert len(hooks.attentions) == 2 and hooks.attentions[0].shape == (2, 2, grid * grid + 1, grid * grid + 1)
    for method in ("rollout", "grad-rollout"):
        result = explain_batch(model, x, method)
        assert result.maps.shape == (2, grid, grid) and torch.allclose(result.maps.flatten(1).amax(1), torch.ones(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain)  # the hooks are gone afterwards


def test_registry_vit_b_16_hooks_match() -> None:
    model = build_model(get_spec("vit_b_16")).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.05)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        plain = model(x)
        with AttentionHooks(model):
            hooked = model(x)
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=1e-5)
    assert explain_batch(model, x, "rollout").maps.shape == (1, 14, 14)


def test_grad_rollout_explains_the_chosen_class(trained: Path, cifar_root: Path) -> None:
    loaded = load_explained_model(trained)
    model, preprocessing, classes = loaded.module, loaded.preprocessing, loaded.class_names
    images = load_test(cifar_root).images[:2].numpy()
    records, maps = explain_images(model, preprocessing, classes, images, "grad-rollout", target=7)
    assert [r["class"]["label"] for r in records] == ["horse", "horse"] and maps.shape == (2, 8, 8)
    top = explain_images(model, preprocessing, classes, images)[0]
    assert [r["class"]["index"] for r in top] == [r["predictions"][0]["class_index"] for r in top]


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def main_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    """Run the CLI in this process (as the console script does) and return its one error line."""
    from vitdeploy.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_explain_command_writes_maps_and_refuses_bad_input(exported: Path, trained: Path, cifar_root: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    image = tmp_path / "cat one.png"
    image.write_bytes(png_bytes(load_test(cifar_root).images[3].numpy()))
    result = run_cli("explain", str(exported), str(image), str(image), "--out", str(tmp_path / "maps"), "--method", "grad-rollout",
                     "--class", "dog")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "maps" / "cat_one.json").read_text())
    assert record["grid"] == [8, 8] and len(record["map"]) == 8 and record["class"]["label"] == "dog"
    assert (tmp_path / "maps" / "cat_one-1.png").is_file()  # the same name twice: kept apart
    assert Image.open(tmp_path / "maps" / "cat_one.png").size[0] > 3 * 224
    moved = tmp_path / "moved"
    shutil.copytree(exported, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["model"]["source_checkpoint"]["path"] = str(tmp_path / "gone.pt")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    for args, fragments in (
        ((str(moved), str(image)), ("explain needs the PyTorch weights", "--checkpoint")),
        ((str(exported), str(image), "--class", "zebra"), ("--class must be a class name",)),
        ((str(exported), str(image), "--class", "10"), ("index from 0 to 9",)),
        ((str(exported), str(image), "--method", "saliency"), ("unknown method 'saliency'",)),
        ((str(exported), str(tmp_path / "maps" / "cat_one.json")), ("is not a readable image",)),
        ((str(exported), str(image), "--discard-ratio", "1"), ("--discard-ratio must be in [0, 1)",)),
    ):
        line = main_error(capsys, "explain", *args, "--out", str(tmp_path / "x"))
        assert all(fragment in line for fragment in fragments), line
    assert not (tmp_path / "x").exists()
    from vitdeploy.cli import main

    with pytest.raises(SystemExit) as success:
        main(["explain", str(moved), str(image), "--out", str(tmp_path / "y"), "--checkpoint", str(trained / "best.pt")])
    assert success.value.code == 0
    assert (tmp_path / "y" / "cat_one.json").is_file()


def test_explain_endpoint(exported: Path, trained: Path, cifar_root: Path, tmp_path: Path) -> None:
    image = load_test(cifar_root).images[5].numpy()
    body = png_bytes(image)
    with serve_client(artifacts=exported, max_batch=8) as client:
        answer = client.post("/v1/explain", content=body, headers={"content-type": "image/png"})
        assert answer.status_code == 200, answer.text
        data = answer.json()
        predicted = client.post("/v1/predict", content=body).json()["predictions"][0]
        assert data["served_top1"]["class_index"] == predicted["class_index"] == data["class"]["index"]
        loaded = load_explained_model(trained)
        model, preprocessing, classes = loaded.module, loaded.preprocessing, loaded.class_names
        offline = explain_images(model, preprocessing, classes, image[None])[1][0]
        np.testing.assert_allclose(np.array(data["map"]), offline, atol=1e-4)
        picture = client.post("/v1/explain?format=png&method=grad-rollout&class=3", files={"file": ("x.png", body, "image/png")})
        assert picture.headers["content-type"] == "image/png" and Image.open(io.BytesIO(picture.content)).size == (224, 224)
        for query, fragment in (("?method=x", "method must be"), ("?format=gif", "format must be"), ("?class=11", "class must be")):
            bad = client.post("/v1/explain" + query, content=body)
            assert bad.status_code == 400 and fragment in bad.json()["error"]
        assert client.post("/v1/explain", content=b"not an image").status_code == 400
        metrics = client.get("/metrics").text
        assert 'vitdeploy_requests_total{endpoint="/v1/explain",status="200"} 2.0' in metrics
        assert "vitdeploy_explain_seconds_count 2.0" in metrics
        assert client.get("/favicon.ico").headers["content-type"] == "image/svg+xml"
        assert client.get("/v1/model").json()["serving"]["explain"]["available"] is True
    moved = tmp_path / "moved"
    shutil.copytree(exported, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["model"]["source_checkpoint"]["path"] = str(tmp_path / "gone.pt")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with serve_client(artifacts=moved, max_batch=8) as client:  # starts without the checkpoint
        assert client.post("/v1/predict", content=body).status_code == 200
        refused = client.post("/v1/explain", content=body)
        assert refused.status_code == 503 and "--checkpoint" in refused.json()["error"]


def test_explainer_takes_one_at_a_time_and_refuses_beyond_its_queue(trained: Path, cifar_root: Path) -> None:
    explainer, reason = Explainer.open(trained, None, max_waiting=2)
    assert explainer is not None and not reason
    image = load_test(cifar_root).images[0].numpy()
    threads: set[str] = set()
    real = explainer._explain

    def recording(*args):  # noqa: ANN002
        import threading

        threads.add(threading.current_thread().name)
        return real(*args)

    explainer._explain = recording

    async def burst() -> list[object]:
        return await asyncio.gather(*(explainer.explain(image, "rollout", 0) for _ in range(4)), return_exceptions=True)

    results = asyncio.run(burst())
    assert sum(isinstance(r, ExplainBusy) for r in results) == 2 and sum(isinstance(r, tuple) for r in results) == 2
    assert len(threads) == 1 and explainer.pending == 0
    explainer.close()
    assert Explainer.open(trained, None, max_waiting=0)[0] is None


def test_many_images_are_explained_in_chunks_with_the_same_maps(trained: Path, cifar_root: Path) -> None:
    from vitdeploy.explain import EXPLAIN_CHUNK
    from vitdeploy.preprocess import Preprocess

    loaded = load_explained_model(trained)
    model, preprocessing, classes = loaded.module, loaded.preprocessing, loaded.class_names
    images = load_test(cifar_root).images[:EXPLAIN_CHUNK + 3].numpy()
    records, maps = explain_images(model, preprocessing, classes, images)
    whole = explain_batch(model, Preprocess(preprocessing)(torch.from_numpy(images)))
    np.testing.assert_allclose(maps, whole.maps.numpy(), atol=1e-5)
    assert len(records) == len(images)
