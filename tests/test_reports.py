"""reports/ holds one file set per benchmark, device and path, under the name its command writes by default."""

import json
from pathlib import Path

from experiments.bench_inference import report_paths

ROOT = Path(__file__).resolve().parents[1]


def test_report_paths_name_dataset_device_and_path():
    paths = report_paths("fashion-mnist", "cuda", "graphs")
    assert paths == {"json": "reports/bench_inference_fashion-mnist_cuda_graphs.json",
                     "markdown": "reports/bench_inference_fashion-mnist_cuda_graphs.md",
                     "plot": "reports/bench_latency_fashion-mnist_cuda_graphs.png"}
    beside = report_paths("data/mine.npz", "cpu", "aot", "runs/b.json")
    assert beside == {"json": "runs/b.json", "markdown": "runs/b.md", "plot": "runs/bench_latency_mine_cpu_aot.png"}


def test_each_inference_benchmark_file_is_the_one_its_command_writes():
    files = sorted((ROOT / "reports").glob("bench_inference_*.json"))
    assert files, "the inference benchmark's reports are shipped"
    plots = set()
    for file in files:
        run = json.loads(file.read_text())
        device = run["device"].split(":")[0]
        expected = report_paths(run["dataset"], device, run["path"])
        assert f"reports/{file.name}" == expected["json"], f"{file.name} records {device}, {run['path']}"
        assert (ROOT / expected["markdown"]).is_file(), f"{file.name} has its tables beside it"
        plots.add(Path(expected["plot"]).name)
    strays = {p.name for p in (ROOT / "reports").glob("bench_latency_*.png")} - plots
    assert not strays, f"plots of no current benchmark run: {sorted(strays)}"
