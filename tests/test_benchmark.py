"""benchmarks/train_speed.py: taking turns epoch by epoch does not change any trainer's trajectory."""

import importlib.util
from pathlib import Path

import torch

from vaelib.training import fit

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "train_speed.py"
_spec = importlib.util.spec_from_file_location("train_speed", _PATH)
train_speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_speed)

CPU = torch.device("cpu")


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_interleaved_trainers_follow_their_own_trajectories(tmp_path):
    x = torch.rand(256, 784, generator=torch.Generator().manual_seed(0))
    alone = train_speed.dataloader_epochs(x, CPU, 64, True)
    for _ in range(2):
        loop_alone, _, _, _ = next(alone)
    straight = fit(train_speed.new_model(CPU), x, epochs=2, batch_size=64, binarize=True, device=CPU, seed=0,
                   progress=False)

    loop = train_speed.dataloader_epochs(x, CPU, 64, True)
    ours = train_speed.vaelib_epochs(x, CPU, 64, True, "auto", tmp_path / "run")
    for _ in range(2):  # loop, vaelib, loop, vaelib: each consumes random numbers in between the other's
        loop_model, _, _, _ = next(loop)
        vaelib_model, seconds, path, setup = next(ours)
    assert path == "eager" and seconds > 0 and setup == {"capture": 0.0}
    assert torch.equal(_params(loop_model), _params(loop_alone))
    assert torch.equal(_params(vaelib_model), _params(straight.model))


def test_readme_performance_table_is_the_committed_results():
    """The README's figures are the result files' (regenerate with
    ``python benchmarks/train_speed.py --readme-table``), not typed."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = train_speed.readme_table(train_speed.RESULTS / name for name in train_speed.README_RESULTS)
    assert table in readme


def test_readme_fit_many_figures_are_the_committed_results():
    import json

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    ways = json.loads((train_speed.RESULTS / "fit-many-cpu-2cores.json").read_text())["ways"]
    for name in ("one after another, 1 thread", "one after another, 2 threads"):
        assert f"{ways[name]['ratio_to_fit_many']:.2f}x faster" in readme, name


def test_step_breakdown_runs_and_writes_its_parts(tmp_path):
    """A smoke run of benchmarks/step_breakdown.py (two steps, one round): it runs, and times every part."""
    import json

    spec = importlib.util.spec_from_file_location("step_breakdown", _PATH.parent / "step_breakdown.py")
    step_breakdown = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_breakdown)
    out = tmp_path / "parts.json"
    assert step_breakdown.main(["--steps", "2", "--rounds", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    ms = result["ms_per_step"]
    assert set(ms) == {"full_step", "without_adam", "forward_only", "products", "linears_autograd", "adam_step",
                       "binarisation", "likelihood"}
    assert all(v > 0 for v in ms.values())


def test_readme_step_breakdown_figures_are_the_committed_results():
    import json

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    result = json.loads((train_speed.RESULTS / "step-breakdown-cpu-2threads.json").read_text())
    ratios = result["ratios_to_products"]
    floor = ratios["floor of this work: products + adam_step + binarisation + likelihood"]
    assert f"add up to {floor:.2f}x the ceiling" in readme
    assert f"cost {ratios['linears_autograd']:.2f}x" in readme
    assert f"adds {result['iwae_chunk']['likelihood_over_products']:.2f} of the decoder's products" in readme
