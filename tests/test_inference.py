import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from PIL import Image

from backbone import flops
from backbone.checkpoint import backbone_hash, save_checkpoint
from backbone.data import DataError, load_dataset
from backbone.grid import GridPoint
from envs import FeatureSpec, compute_features, staged_flops
from evaluation.benchmark import KEYS, benchmark_inference, largest_in_batch
from experiments import bench_inference, infer
from inference import AdaptiveClassifier, InferencePathError, load_images
from inference.graphs import GraphsRunner
from inference.plan import ExtensionPass, padded, plan_extensions
from policy import PolicyArtifact, PolicyArtifactError, save_policy
from policy.artifact import make_policy


@pytest.fixture(scope="module")
def digits_images():
    split = load_dataset("digits").splits["test"]
    return split.x[:64], split.y[:64]


def random_artifact(config, digest: str, seed: int = 0, scaler=None, spec: FeatureSpec | None = None) -> PolicyArtifact:
    """A policy with random weights whose actions vary across inputs (no PPO needed)."""
    torch.manual_seed(seed)
    spec = FeatureSpec() if spec is None else spec
    n = spec.dim(config)
    policy = make_policy(n, [len(config.token_grans), config.depth, len(config.ffn_widths)], [16])
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(3 * torch.randn_like(p))
    meta = {"token_grans": list(config.token_grans), "depths": list(range(1, config.depth + 1)),
            "ffn_widths": list(config.ffn_widths), "features": spec.to_dict(), "lam": 0.1, "backbone_hash": digest,
            "net_arch": [16]}
    mean, std = scaler if scaler is not None else (np.zeros(n, np.float32), np.ones(n, np.float32))
    return PolicyArtifact(policy, mean, std, meta)


@pytest.fixture
def dirs(tmp_path, tiny_model, digits_images):
    save_checkpoint(tiny_model, tmp_path / "backbone", {"dataset": "digits", "split_seed": 0})
    # standardise with the real features so the random weights see varied inputs
    features = compute_features(tiny_model, tiny_model.embed(digits_images[0]), FeatureSpec()).numpy()
    scaler = (features.mean(0), features.std(0) + 1e-6)
    artifact = random_artifact(tiny_model.config, backbone_hash(tmp_path / "backbone"), scaler=scaler)
    save_policy(artifact, tmp_path / "policy")
    return tmp_path / "backbone", tmp_path / "policy"


@pytest.fixture
def classifier(dirs):
    return AdaptiveClassifier.from_dirs(*dirs)


@pytest.fixture
def merged_classifier(dirs):
    return AdaptiveClassifier.from_dirs(*dirs, merge_passes=True)


def test_adaptive_equals_each_image_alone(classifier, digits_images):
    x, _ = digits_images
    out = classifier.predict(x)
    assert len(set(out.configs)) >= 3, "the random policy should mix configurations"
    with torch.no_grad():
        for i in range(len(x)):
            alone = classifier.backbone(x[i : i + 1], *out.configs[i])
            assert (alone[0] - out.logits[i]).abs().max().item() <= 1e-5
            one = classifier.predict(x[i : i + 1])  # one image takes a shorter way (no grouping)
            assert one.configs == [out.configs[i]] and (one.logits[0] - out.logits[i]).abs().max().item() <= 1e-5
    assert_answers_are_the_logits(out)
    assert out.logits.shape == (len(x), 10) and out.flops.shape == (len(x),) and out.flops.dtype == np.float64


def test_order_is_preserved_for_shuffled_batches(classifier, digits_images):
    x, _ = digits_images
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    a, b = classifier.predict(x), classifier.predict(x[perm])
    assert torch.allclose(a.logits[perm], b.logits, atol=1e-5)
    assert [a.configs[i] for i in perm.tolist()] == b.configs
    chunked = classifier.predict_batched(x, batch_size=7)
    assert torch.allclose(chunked.logits, a.logits, atol=1e-5) and chunked.configs == a.configs


def test_the_glance_answers_or_is_extended_in_merged_passes(merged_classifier, digits_images, monkeypatch):
    classifier = merged_classifier
    x, _ = digits_images
    model = classifier.backbone
    glance = classifier.spec.glance_config(model.config)
    configs = classifier.choose(x).configs
    assert glance in configs and len(set(configs)) >= 3, "the random policy should answer with the glance and extend"
    answered = [i for i, cfg in enumerate(configs) if cfg == glance]
    with torch.no_grad():
        glance_logits = model(x[answered], *glance)
    calls = {"run": 0, "glance": 0, "passes": 0, "extend_exits": []}
    real_glance, real_exits = model.glance, model.extend_exits
    monkeypatch.setattr(model, "run", lambda *a, **k: calls.__setitem__("run", calls["run"] + 1))
    monkeypatch.setattr(model, "glance", lambda *a, **k: calls.__setitem__("glance", calls["glance"] + 1) or real_glance(*a, **k))

    def recording_exits(state, tokens, width, rows_at_depth, tokens_at_depth=None, hidden_at_depth=None):
        calls["passes"] += 1
        hidden_to_width = {model.config.ffn_hidden_units(w): w for w in model.config.ffn_widths}
        for d, rows in enumerate(rows_at_depth, start=1):
            row_tokens = [tokens] * len(rows) if tokens_at_depth is None else tokens_at_depth[d - 1].tolist()
            row_widths = ([width] * len(rows) if hidden_at_depth is None
                          else [hidden_to_width[h] for h in hidden_at_depth[d - 1].tolist()])
            calls["extend_exits"] += [(t, d, w) for t, w in zip(row_tokens, row_widths, strict=True)]
        return real_exits(state, tokens, width, rows_at_depth, tokens_at_depth, hidden_at_depth)

    monkeypatch.setattr(model, "extend_exits", recording_exits)
    out = classifier.predict(x)
    assert calls["run"] == 0 and calls["glance"] == 1
    expected = {cfg: configs.count(cfg) for cfg in set(configs) if cfg != glance}
    extended = {cfg: calls["extend_exits"].count(cfg) for cfg in set(calls["extend_exits"])}
    assert extended == expected, "each input once, at its own configuration"
    groups = {(cfg[0], cfg[2]) for cfg in expected}
    assert len(groups) >= 3, "the random policy should send inputs to several (tokens, width)"
    assert calls["passes"] == len(plan_extensions(configs, glance, merge=True).passes) < len(groups), "merged passes"
    assert torch.allclose(out.logits[answered], glance_logits, atol=1e-5)
    only_glance = classifier.predict(x[answered])  # its class and confidence come with the glance
    assert set(only_glance.configs) == {glance} and len(calls["extend_exits"]) == sum(expected.values())
    assert torch.allclose(only_glance.logits, glance_logits, atol=1e-5)
    assert_answers_are_the_logits(only_glance)
    state = classifier.choose(x).glance.state
    for cfg, rows in [((8, 3, 1.0), None), ((4, 2, 0.5), torch.tensor([5, 0, 2]))]:  # one exit of extend_exits
        with torch.inference_mode():
            reference = model.extend(state, *cfg, rows=rows)
        assert torch.allclose(classifier.extend(state, cfg, rows), reference, atol=1e-5), cfg


def assert_answers_are_the_logits(out):
    assert torch.equal(out.classes, out.logits.argmax(-1))
    assert torch.allclose(out.confidence, out.logits.softmax(-1).amax(-1))


def test_run_mixed_equals_run_alone(tiny_model):
    x = torch.rand(9, 1, 8, 8)
    configs = [(4, 3, 0.5), (2, 1, 1.0), (4, 2, 0.5), (8, 3, 0.25), (4, 1, 0.5), (2, 2, 1.0), (8, 1, 0.25),
               (8, 3, 1.0), (4, 3, 0.5)]
    with torch.no_grad():
        tokens = tiny_model.embed(x)
        mixed = tiny_model.run_mixed(tokens, configs)
        shared = tiny_model.run_mixed(tokens, configs, read_kv=tiny_model.read_kv(tokens))
        for i, cfg in enumerate(configs):
            alone = tiny_model.run(tokens[i : i + 1], *cfg)[0]
            assert (mixed[i] - alone).abs().max().item() <= 1e-5
            assert (shared[i] - alone).abs().max().item() <= 1e-5
        assert tiny_model.run_mixed(tokens[:0], []).shape == (0, 10)
    with pytest.raises(ValueError, match="depth"):
        tiny_model.run_mixed(tokens[:1], [(4, 0, 0.5)])
    with pytest.raises(ValueError, match="one configuration per input"):
        tiny_model.run_mixed(tokens, configs[:3])


def test_flops_per_image_and_fixed_override(classifier, digits_images):
    x, _ = digits_images
    c = classifier.backbone.config
    out = classifier.predict(x)
    staged = staged_flops(classifier.spec, c)
    index = [(c.token_index(t), d - 1, c.width_index(w)) for t, d, w in out.configs]
    assert np.allclose(out.flops, [staged[i] + classifier.artifact.network_flops() for i in index])
    fixed = classifier.predict(x, config=(4, 2, 0.5))
    assert set(fixed.configs) == {(4, 2, 0.5)}
    assert np.allclose(fixed.flops, flops(c, 4, 2, 0.5))
    assert torch.allclose(fixed.logits, classifier.backbone(x, 4, 2, 0.5), atol=1e-5)


def test_errors(dirs, classifier, tiny_model, tmp_path, digits_images):
    backbone_dir, _ = dirs
    x = digits_images[0][:2]
    with pytest.raises(ValueError, match="images must have shape"):
        classifier.predict(torch.rand(2, 1, 9, 9))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        classifier.predict(bad)
    with pytest.raises(ValueError, match="float in"):
        classifier.predict((x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="empty"):
        classifier.predict(x[:0])
    with pytest.raises(ValueError, match="allowed"):
        classifier.predict(x, config=(3, 1, 1.0))
    with pytest.raises(ValueError, match="outside"):
        classifier.predict(x, config=(4, 9, 1.0))
    # a policy for another backbone
    save_policy(random_artifact(tiny_model.config, "f" * 64), tmp_path / "other")
    with pytest.raises(PolicyArtifactError, match="trained for backbone"):
        AdaptiveClassifier.from_dirs(backbone_dir, tmp_path / "other")
    with pytest.raises(PolicyArtifactError, match="trained for backbone"):
        AdaptiveClassifier(tiny_model, random_artifact(tiny_model.config, "f" * 64), backbone_hash(backbone_dir))
    # a policy whose grid is not the backbone's
    artifact = random_artifact(tiny_model.config, "f" * 64)
    artifact.meta["ffn_widths"] = [0.5, 1.0]
    with pytest.raises(ValueError, match=r"ffn_widths \[0.5, 1.0\] do not match the backbone's \[0.25, 0.5, 1.0\]"):
        AdaptiveClassifier(tiny_model, artifact)


HAS_COMPILER = any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++"))
HAS_ONNX = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnxscript") is not None


PATHS = [
    pytest.param("compiled", marks=pytest.mark.skipif(not HAS_COMPILER, reason="needs a C++ compiler (apt-get install g++)")),
    pytest.param("aot", marks=pytest.mark.skipif(not HAS_COMPILER, reason="needs a C++ compiler (apt-get install g++)")),
    pytest.param("onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason='needs ONNX Runtime (pip install -e ".[onnx]")'))]


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_compiled_paths_give_the_eager_logits_and_choices(dirs, digits_images, path, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPERCEIVER_ONNX_CACHE", str(tmp_path / "onnx"))
    x = digits_images[0][:6]
    eager, compiled = AdaptiveClassifier.from_dirs(*dirs), AdaptiveClassifier.from_dirs(*dirs, path=path, merge_passes=True)
    assert compiled.path == path and eager.path == "eager"
    for batch in (x, x[2:3]):  # batch 1 is a graph of its own under torch.compile
        ref, out = eager.predict(batch), compiled.predict(batch)
        assert len(set(ref.configs)) >= 2 or len(batch) == 1, "the random policy should extend some inputs"
        assert out.configs == ref.configs
        assert (out.logits - ref.logits).abs().max().item() <= 1e-4
        np.testing.assert_array_equal(out.flops, ref.flops)
        assert_answers_are_the_logits(out)
    glance = eager.spec.glance_config(eager.backbone.config)
    answered = [i for i, cfg in enumerate(eager.predict(x).configs) if cfg == glance]
    assert answered, "the random policy should answer some inputs with the glance"
    only_glance = compiled.predict(x[answered])
    assert set(only_glance.configs) == {glance}
    assert (only_glance.logits - eager.predict(x[answered]).logits).abs().max().item() <= 1e-4
    assert_answers_are_the_logits(only_glance)
    full = eager.backbone.resolve(None, None, None)
    assert (compiled.forward_config(x, full) - eager.forward_config(x, full)).abs().max().item() <= 1e-4
    kinds = {key.kind for key in compiled.runner.programs}
    assert kinds == {"glance", "extend", "forward"}, "every part ran on the compiled path"
    merged = [key for key in compiled.runner.programs
              if key.kind == "extend" and not key.shapes and (key.per_row_tokens or key.per_row_widths)]
    assert merged, "a merged pass with per-row configs"
    assert compiled.runner.programs_built == len(compiled.runner.programs) and compiled.compile_seconds > 0
    if path == "onnx":  # exported once, atomically, beside a key of the weights; a second runner loads them
        files = sorted((tmp_path / "onnx").rglob("*.onnx"))
        assert len(files) == len(compiled.runner.programs) and not list((tmp_path / "onnx").rglob("*.tmp*"))
        again = AdaptiveClassifier.from_dirs(*dirs, path=path, merge_passes=True)
        assert torch.allclose(again.predict(x).logits, compiled.predict(x).logits, atol=1e-6)
        assert sorted((tmp_path / "onnx").rglob("*.onnx")) == files, "loaded, not exported again"
    if path == "aot":  # one image has programs compiled for its shapes; a batch, the programs of every batch size
        batch = eager.predict(x)
        extended = next(i for i, cfg in enumerate(batch.configs) if cfg != glance)
        for i in (extended, answered[0]):
            one = compiled.predict(x[i : i + 1])
            assert one.configs == [batch.configs[i]]
            assert (one.logits[0] - batch.logits[i]).abs().max().item() <= 1e-4
        assert (compiled.forward_config(x[:1], full) - eager.forward_config(x[:1], full)).abs().max().item() <= 1e-4
        assert {key.kind for key in compiled.runner.programs if key.shapes} == {"glance", "extend", "forward"}
        assert any(key.kind == "glance" and not key.shapes for key in compiled.runner.programs)


def test_graphs_path_pads_rows_and_keeps_only_the_real_logits(dirs, digits_images, monkeypatch):
    # the graphs path's own logic on a CPU: each extension's rows padded to a power of two, the padding's logits
    # dropped, outputs handed over as copies; only the recording into a CUDA graph is left out (eager stands in)
    x = digits_images[0][:24]
    eager, graphs = AdaptiveClassifier.from_dirs(*dirs), AdaptiveClassifier.from_dirs(*dirs)
    seen = []

    class GraphsOnCpu(GraphsRunner):
        def build(self, program):
            names = pytree.tree_leaves(program.batch_dims)

            def call(*args):
                seen.extend(len(a) for a, name in zip(pytree.tree_leaves(args), names, strict=True)
                            if isinstance(name, str) and name.startswith("rows_"))
                return program.fn(*args)
            return call

    graphs.runner = GraphsOnCpu(graphs.backbone, graphs.artifact)
    ref, out = eager.predict(x), graphs.predict(x)
    assert out.configs == ref.configs and len(set(ref.configs)) >= 3
    assert (out.logits - ref.logits).abs().max().item() <= 1e-5
    assert seen and all(n & (n - 1) == 0 for n in seen), f"row counts not padded to powers of two: {seen}"
    counts = [ref.configs.count(cfg) for cfg in set(ref.configs)]
    assert any(n & (n - 1) for n in counts), "the random policy should give some depth a row count to pad"
    assert_answers_are_the_logits(out)
    state = graphs.choose(x).glance.state
    rows = torch.tensor([5, 0, 2])  # 3 rows, padded to 4
    with torch.inference_mode():
        reference = eager.backbone.extend(state, 4, 2, 0.5, rows=rows)
    assert torch.allclose(graphs.extend(state, (4, 2, 0.5), rows), reference, atol=1e-5)


def _layout(plan):
    """A plan as {(tokens, width): {depth: rows}}, the shape its tests are written in."""
    return {(p.tokens, p.width): {d: list(rows) for d, rows in enumerate(p.rows_at_depth, start=1) if rows}
            for p in plan.passes}


def test_plan_extensions():
    glance = GridPoint(4, 1, 0.25)
    configs = [glance, GridPoint(8, 3, 0.5), GridPoint(8, 1, 0.25), GridPoint(4, 2, 0.25), GridPoint(8, 3, 0.5),
               GridPoint(16, 2, 0.25), GridPoint(4, 5, 0.5)]
    merged = plan_extensions(configs, glance, merge=True)
    assert merged.answered == (0,)
    # one pass per token count at its widest width; the glance's token count joins the next larger one
    assert _layout(merged) == {(8, 0.5): {1: [2], 2: [3], 3: [1, 4], 5: [6]}, (16, 0.25): {2: [5]}}
    eight = next(p for p in merged.passes if p.tokens == 8)
    assert eight.depth == 5 and eight.rows == [2, 3, 1, 4, 6], "logits come back by exit depth, then batch order"
    assert eight.row_tokens == ((8,), (4,), (8, 8), (), (4,)) and eight.row_widths == ((0.25,), (0.25,), (0.5, 0.5), (), (0.5,))
    assert next(p for p in merged.passes if p.tokens == 16).row_tokens is None, "one configuration: no per-row values"
    # alone, the glance's token count keeps its own pass
    assert _layout(plan_extensions([glance, GridPoint(4, 3, 0.25)], glance, merge=True)) == {(4, 0.25): {3: [1]}}
    assert plan_extensions([glance, glance], glance) == plan_extensions([glance, glance], glance, merge=True)
    assert plan_extensions([glance, glance], glance).passes == () and plan_extensions([glance, glance], glance).answered == (0, 1)
    # not merged (the default): one pass per (tokens, width), in the order of their first input, no per-row values
    plain = plan_extensions(configs, glance)
    assert _layout(plain) == {(8, 0.5): {3: [1, 4]}, (8, 0.25): {1: [2]}, (4, 0.25): {2: [3]}, (16, 0.25): {2: [5]},
                              (4, 0.5): {5: [6]}}
    assert all(p.row_tokens is None and p.row_widths is None for p in plain.passes)
    assert sorted(i for p in plain.passes for i in p.rows) == [1, 2, 3, 4, 5, 6], "every other row exactly once"


def test_padded_extension():
    extension = ExtensionPass(8, 0.5, ((7, 3, 9), (), (4,), (1, 2)), row_tokens=((8, 4, 8), (), (4,), (8, 8)))
    pad = padded(extension)
    assert pad.rows_at_depth == ((7, 3, 9, 7), (), (4,), (1, 2)) and pad.row_tokens == ((8, 4, 8, 8), (), (4,), (8, 8))
    assert pad.row_widths is None and (pad.tokens, pad.width) == (8, 0.5)


def fashion_test_images() -> torch.Tensor:
    """Fashion-MNIST test images the shipped policy answers at the glance, and extends to several depths at one
    (tokens, width): each path builds two programs for them, the glance and one merged extension pass."""
    pool = torch.as_tensor(load_dataset("fashion-mnist").splits["test"].x[:512])
    classifier = AdaptiveClassifier.from_dirs("checkpoints/fashion-mnist", "policies/fashion-mnist")
    configs, glance = classifier.predict(pool).configs, classifier.glance_point
    extended = [c for c in configs if c != glance]
    tokens_width = max({(c.tokens, c.width) for c in extended},
                       key=lambda tw: len({c.depth for c in extended if (c.tokens, c.width) == tw}))
    first_at = {}
    for i, c in enumerate(configs):
        if c == glance or (c.tokens, c.width) == tokens_width:
            first_at.setdefault(c, i)
    return pool[sorted(first_at.values())[:6]]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
@pytest.mark.parametrize("path", PATHS)
def test_every_path_gives_the_eager_answers_on_fashion_mnist_test_images(path, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPERCEIVER_ONNX_CACHE", str(tmp_path / "onnx"))
    x = fashion_test_images()
    dirs = ("checkpoints/fashion-mnist", "policies/fashion-mnist")
    ref = AdaptiveClassifier.from_dirs(*dirs).predict(x)
    out = AdaptiveClassifier.from_dirs(*dirs, path=path, merge_passes=True).predict(x)
    assert len(set(ref.configs)) >= 3 and out.configs == ref.configs
    assert (out.logits - ref.logits).abs().max().item() <= 1e-4
    np.testing.assert_array_equal(out.flops, ref.flops)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphs_path_gives_the_eager_logits_and_choices_on_cuda(dirs, digits_images):
    x = digits_images[0][:24].cuda()
    eager = AdaptiveClassifier.from_dirs(*dirs, device="cuda")
    graphs = AdaptiveClassifier.from_dirs(*dirs, device="cuda", path="graphs")
    for batch in (x, x[:6], x[2:3], x[:6]):  # the second x[:6] replays the graphs the first recorded
        ref, out = eager.predict(batch), graphs.predict(batch)
        assert out.configs == ref.configs
        assert (out.logits - ref.logits).abs().max().item() <= 1e-4
        np.testing.assert_array_equal(out.flops, ref.flops)
        assert_answers_are_the_logits(out)
    recorded = sum(len(fn.graphs) for fn in graphs.runner.programs.values())
    graphs.predict(x[:6])
    assert sum(len(fn.graphs) for fn in graphs.runner.programs.values()) == recorded, "same shapes, no new graph"
    full = eager.backbone.resolve(None, None, None)
    first = graphs.forward_config(x[:6], full)
    kept = first.clone()
    graphs.forward_config(x[6:12], full)  # replays the same graph into the same buffers
    assert torch.equal(first, kept), "a returned tensor must not change on the next call"
    assert (first - eager.forward_config(x[:6], full)).abs().max().item() <= 1e-4
    assert {key.kind for key in graphs.runner.programs} == {"glance", "extend", "forward"}


def test_inference_path_errors(dirs, monkeypatch):
    with pytest.raises(InferencePathError, match="unknown inference path 'jit'; choose one of eager, compiled, aot, graphs, onnx"):
        AdaptiveClassifier.from_dirs(*dirs, path="jit")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(InferencePathError, match=r"the onnx path needs ONNX Runtime .*pip install -e \".\[onnx\]\""):
        AdaptiveClassifier.from_dirs(*dirs, path="onnx")
    monkeypatch.setattr("inference.compiled.shutil.which", lambda name: None)
    with pytest.raises(InferencePathError, match="needs a C.. compiler"):
        AdaptiveClassifier.from_dirs(*dirs, path="aot")
    assert AdaptiveClassifier.from_dirs(*dirs).path == "eager", "the eager path needs no compiler"
    with pytest.raises(InferencePathError, match="graphs path replays CUDA graphs and needs a CUDA device"):
        AdaptiveClassifier.from_dirs(*dirs, path="graphs")
    with pytest.raises(SystemExit):
        infer.main(["--backbone", str(dirs[0]), "--policy", str(dirs[1]), "--input", "x.npz", "--path", "jit"])


def test_infer_cli_on_npz_and_png_folder(dirs, digits_images, tmp_path, capsys):
    backbone_dir, policy_dir = dirs
    common = ["--backbone", str(backbone_dir), "--policy", str(policy_dir), "--device", "cpu"]
    x, y = digits_images
    np.savez(tmp_path / "in.npz", x=(x[:10, 0].numpy() * 255).astype(np.uint8), y=y[:10].numpy())
    result = infer.main([*common, "--input", str(tmp_path / "in.npz"), "--json", str(tmp_path / "out.json")])
    printed = capsys.readouterr().out
    assert printed.count("config (") == 10 and "images_per_s" in printed and "flop_reduction" in printed
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["totals"]["images"] == 10 and 0 <= saved["totals"]["accuracy"] <= 1
    assert saved["totals"]["mean_gflops"] > 0 and saved["totals"]["images_per_s"] > 0
    assert saved == json.loads(json.dumps(result))

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8)).resize((32, 32)).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    result = infer.main([*common, "--input", str(folder), "--config", "4,2,0.5"])
    assert [r["name"] for r in result["images"]] == ["img0.png", "img1.png", "img2.png"]
    assert all(r["config"] == [4, 2, 0.5] for r in result["images"]) and "accuracy" not in result["totals"]
    assert capsys.readouterr().out.count("img") == 3
    with pytest.raises(SystemExit):
        infer.main([*common, "--input", str(folder), "--config", "4,2"])


def test_load_images_errors(tiny_config, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG or JPEG"):
        load_images(tmp_path / "empty", tiny_config)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="not a readable image"):
        load_images(tmp_path / "broken", tiny_config)
    np.savez(tmp_path / "labels_only.npz", y=np.zeros(3, np.int64))
    with pytest.raises(DataError, match="missing array 'x'"):
        load_images(tmp_path / "labels_only.npz", tiny_config)


def test_benchmark_reports_every_key(merged_classifier, digits_images):
    classifier = merged_classifier
    result = benchmark_inference(classifier, digits_images[0][:32], batch_size=16, min_seconds=0.01, warmup=1, rounds=2)
    assert result["rounds"] == 2
    for key in KEYS:
        assert result[key] > 0, key
    assert result["images"] == 32 and result["adaptive_gflops"] <= result["naive_gflops"], "naive pays the batch max"
    glance = classifier.spec.glance_config(classifier.backbone.config)
    assert result["glance_gflops"] == pytest.approx(flops(classifier.backbone.config, *glance) / 1e9)
    glance_rate = result["glance_images_per_s"] * result["glance_gflops"]
    assert result["glance_efficiency"] == pytest.approx(glance_rate / result["full_gflop_per_s"])
    assert largest_in_batch([(2, 3, 0.25), (8, 1, 0.5)]) == (8, 3, 0.5)
    extended = [{cfg for cfg in classifier.predict(batch).configs if cfg != glance}
                for batch in digits_images[0][:32].split(16)]
    assert min(len(e) for e in extended) >= 2, "the random policy should extend to several configurations"
    plans = [plan_extensions(classifier.predict(batch).configs, glance, merge=True) for batch in digits_images[0][:32].split(16)]
    deepest = [[max(d for d, rows in enumerate(p.rows_at_depth, 1) if rows) for p in plan.passes] for plan in plans]
    assert result["extension_passes_per_batch"] == np.mean([len(d) for d in deepest])
    assert result["extension_blocks_per_batch"] == np.mean([sum(d) for d in deepest])
    # merged passes: more arithmetic than counted, as torch's counter sees it
    assert result["adaptive_performed_gflops"] > result["adaptive_gflops"]
    assert result["unmerged_images_per_s"] > 0 and classifier.merge_passes, "timed without merging, on a twin"
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        benchmark_inference(classifier, digits_images[0][:32], batch_size=16, rounds=0)


def test_bench_inference_cli(dirs, capsys, tmp_path):
    backbone_dir, policy_dir = dirs
    results = bench_inference.main(["--dataset", "digits", "--backbone", str(backbone_dir), "--policy", str(policy_dir),
                                    "--batch-sizes", "1,8", "--limit", "16", "--limit-batch1", "4", "--rounds", "2",
                                    "--min-seconds", "0", "--warmup", "1", "--quiet", "--json", str(tmp_path / "b.json"),
                                    "--markdown", str(tmp_path / "b.md"), "--plot", str(tmp_path / "b.png")])
    assert [r["batch_size"] for r in results] == [1, 8] and [r["images"] for r in results] == [4, 16]
    printed = capsys.readouterr().out
    assert "| 8 |" in printed and "p50 ms" in printed and "matmul peak" in printed
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["matmul_peak"]["gflop_per_s"] > 0
    variants = saved["latency_batch1"]["variants"]
    assert {"full", "adaptive"} <= set(variants) and len(variants) >= 3, "each configuration the policy uses"
    for v in variants.values():
        assert 0 < v["p50"] <= v["p90"] <= v["p99"] and v["gflop_per_s"] > 0
    used = [v["share_of_inputs"] for name, v in variants.items() if name.startswith("config ")]
    assert sum(used) == pytest.approx(1.0)
    assert (tmp_path / "b.md").read_text().startswith("device:")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(dirs, digits_images):
    x, _ = digits_images
    cpu = AdaptiveClassifier.from_dirs(*dirs).predict(x)
    gpu = AdaptiveClassifier.from_dirs(*dirs, device="cuda").predict(x)
    assert gpu.configs == cpu.configs
    assert torch.allclose(gpu.logits, cpu.logits, atol=1e-4)


def test_reported_flops_match_torch_flop_counter(dirs, digits_images):
    # end to end: what predict() says an image costs is what torch counts it doing, glance and policy included
    from backbone import measure_flops

    classifier = AdaptiveClassifier.from_dirs(*dirs)  # the default path, as a user gets it
    assert not classifier.merge_passes
    for i in range(4):
        x = digits_images[0][i : i + 1]
        reported = classifier.predict(x).flops[0]
        counted = measure_flops(lambda x=x: classifier.predict(x))
        assert reported == counted, (reported, counted)
    x = digits_images[0]  # a batch mixing the glance's answers and several extensions: exactly what torch counts
    reported = classifier.predict(x).flops.sum()
    assert len(set(classifier.predict(x).configs)) >= 3 and reported == measure_flops(lambda: classifier.predict(x))
    # merged passes (opt-in) do more arithmetic than the configurations count, for the same logits
    merging = AdaptiveClassifier.from_dirs(*dirs, merge_passes=True)
    merged = measure_flops(lambda: merging.predict(x))
    assert merged > reported and torch.allclose(merging.predict(x).logits, classifier.predict(x).logits, atol=1e-5)


def test_reported_flops_match_with_a_deeper_glance(tmp_path, tiny_model, digits_images):
    # a policy whose glance is two blocks deep (train_policy.py --glance TOKENS,2,WIDTH): extensions reuse both blocks,
    # and what predict() charges is still what torch counts
    from backbone import measure_flops

    spec = FeatureSpec(glance_depth=2)
    save_checkpoint(tiny_model, tmp_path / "backbone", {"dataset": "digits", "split_seed": 0})
    features = compute_features(tiny_model, tiny_model.embed(digits_images[0]), spec).numpy()
    artifact = random_artifact(tiny_model.config, backbone_hash(tmp_path / "backbone"),
                               scaler=(features.mean(0), features.std(0) + 1e-6), spec=spec)
    save_policy(artifact, tmp_path / "policy")
    classifier = AdaptiveClassifier.from_dirs(tmp_path / "backbone", tmp_path / "policy")
    x = digits_images[0]
    result = classifier.predict(x)
    assert classifier.glance_point.depth == 2 and len(set(result.configs)) >= 3
    assert result.flops.sum() == measure_flops(lambda: classifier.predict(x))
    # each input's answer is that of a fresh pass at its own configuration
    for i, config in enumerate(result.configs):
        fresh = tiny_model.run(tiny_model.embed(x[i : i + 1]), *config)
        assert torch.allclose(result.logits[i : i + 1], fresh, atol=1e-4), config


def test_bench_attention_cli(tmp_path, capsys):
    from experiments import bench_attention

    rows = bench_attention.main(["--tiles", "4x4,1x32", "--batch-sizes", "1,3", "--heads", "2", "--head-dim", "4",
                                 "--path", "eager", "--quiet", "--json", str(tmp_path / "a.json")])
    assert [(r["queries"], r["keys"], r["batch_size"]) for r in rows] == [(4, 4, 1), (4, 4, 3), (1, 32, 1), (1, 32, 3)]
    assert all(r["fused_us"] > 0 and r["matmul_softmax_us"] > 0 for r in rows)
    assert [r["rule_picks"] for r in rows] == ["matmul_softmax"] * 2 + ["fused"] * 2, "the compiled graphs' pick"
    assert "| 4x4 | 3 |" in capsys.readouterr().out and json.loads((tmp_path / "a.json").read_text())["rows"] == rows
    with pytest.raises(SystemExit):
        bench_attention.main(["--tiles", "4by4"])


def test_shipped_fashion_policy_reports_what_it_performs():
    # the shipped Fashion-MNIST backbone and policy on the default path: per-image FLOPs summed over a batch that
    # mixes the glance's answers and extensions equal what torch counts (no dataset needed: synthetic images)
    from backbone import measure_flops

    classifier = AdaptiveClassifier.from_dirs("checkpoints/fashion-mnist", "policies/fashion-mnist")
    generator = torch.Generator().manual_seed(0)
    shapes = torch.zeros(48, 1, 28, 28)
    for i in range(48):  # blobs of varied size and contrast, so that some images are easy and some are not
        r0, c0, h, w = (int(v) for v in torch.randint(2, 14, (4,), generator=generator))
        shapes[i, 0, r0 : r0 + h, c0 : c0 + w] = 0.3 + 0.7 * torch.rand(1, generator=generator)
    images = (shapes + 0.15 * torch.rand(shapes.shape, generator=generator)).clamp(0, 1)
    out = classifier.predict(images)
    assert len(set(out.configs)) >= 2, "the batch should mix the glance's answers and extensions"
    assert out.flops.sum() == measure_flops(lambda: classifier.predict(images))


def test_paths_compared_in_the_same_rounds_report_their_own_ratios(dirs, digits_images, monkeypatch):
    from evaluation import benchmark

    eager = AdaptiveClassifier.from_dirs(*dirs)
    # known timings: on "slow" every variant takes twice as long as on "eager"; medians over three rounds
    known = {"full": [4.0, 5.0, 40.0], "adaptive": [1.0, 2.0, 2.5], "glance": [0.5, 0.5, 9.0]}

    def timed(variants, images, rounds, warmup, progress=False):
        assert list(variants) == [f"{p} {v}" for p in ("eager", "slow") for v in ("full", "adaptive", "glance")]
        return {name: [{"mean": (2 if name.startswith("slow") else 1) * ms, "p50": ms}
                       for ms in known[name.split()[1]]] for name in variants}

    monkeypatch.setattr(benchmark, "image_by_image", timed)
    x = digits_images[0][:8]
    result = benchmark.latency_across_paths({"eager": eager, "slow": AdaptiveClassifier.from_dirs(*dirs)}, x, rounds=3)
    flop_speedup = flops(eager.backbone.config) / float(np.mean(eager.predict(x).flops))
    for path, scale in (("eager", 1), ("slow", 2)):
        r = result["paths"][path]
        assert r["full_ms"]["mean"] == 5.0 * scale and r["adaptive_ms"]["mean"] == 2.0 * scale
        assert r["realized_speedup"] == pytest.approx(2.5) and r["flop_speedup"] == pytest.approx(flop_speedup)
        assert r["efficiency"] == pytest.approx(2.5 / flop_speedup)
    assert "| slow | 10.000 | 4.000 | 1.000 |" in benchmark.format_paths(result)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ONNX, reason='needs ONNX Runtime (pip install -e ".[onnx]")')
def test_glance_profiles_see_its_operators(dirs, digits_images, tmp_path, monkeypatch):
    from evaluation.profiles import onnx_profile, torch_profile

    monkeypatch.setenv("ADAPERCEIVER_ONNX_CACHE", str(tmp_path / "onnx"))
    classifier, one = AdaptiveClassifier.from_dirs(*dirs), digits_images[0][:1]
    onnx = onnx_profile(classifier, one, runs=5)
    ops = {r["op"]: r for r in onnx["operators"]}
    assert onnx["runs"] == 5 and "MatMul" in ops and ops["MatMul"]["calls_per_run"] >= 1
    assert 0 < onnx["seen_us_per_run"] <= onnx["wall_us_per_run"] * 1.5
    assert not list(Path.cwd().glob("onnxruntime_profile_*.json")), "the profile file is not left behind"
    eager = torch_profile(lambda: classifier.choose(one), runs=5)
    assert any(r["op"] in ("aten::addmm", "aten::mm", "aten::linear") for r in eager["operators"])
    assert eager["calls_per_run"] > onnx["calls_per_run"], "eager calls more, smaller operators than ONNX Runtime's nodes"
