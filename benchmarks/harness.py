"""Side by side, in one run: us, our peers, and the limits of this machine.

For each model (MobileNetV2, the default EfficientNet-Lite0, ViT-B/16), on the
same real photos of mixed size (`benchmarks/corpus.py`: 50% 500x375, 30%
1024x768, 20% 3000x2000), every system runs as a whole fresh process with its
start-up included, and the systems are interleaved over `--rounds` rounds:

- ours, exact decoding (the default) and ours with `--fast-decode`;
- `transformers.pipeline` at its best batch size (found by a short probe);
- Apache Beam's own `apache_beam/examples/inference/pytorch_image_classification.py`
  as shipped in the installed wheel, run on the same files with the model's
  native (torchvision or timm) implementation and the same local runner as ours.

Measured in the same run, as the limits we are held to:

- the stage limit: decode (exact or fast) plus the model's preprocessing on
  all cores, pipelined with our forward pass, no Beam (steady state);
- the forward-only ceiling: the best of the HF module as loaded, the HF module
  in channels_last, and the native implementation, each with and without the
  glibc malloc setting (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_).

It prints one table of images/s and ratios per model, then the goals:

- exact >= 1.5x the best peer and >= 0.85x the exact stage limit;
- fast >= 2.5x the best peer and >= 0.6x the forward ceiling;
- time to the first output row no more than the transformers loop's;
- (`--rss`) peak RSS at 4,000 images <= 1.15x that at 400;
- (`--zero-shot`) zero-shot at 1,000 labels >= 0.85x the image tower's ceiling.

`--profile` also samples our exact job with py-spy and prints where its CPU
time goes.

    python -m benchmarks.harness [--models mobilenet_v2,default,vit_b16]
        [--images 2000] [--rounds 2] [--rss] [--zero-shot] [--profile] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.output import SUMMARY_FILE  # noqa: E402

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "268435456"}
MODELS = ("mobilenet_v2", "default", "vit_b16")
HF_BATCHES = (1, 4, 8, 16, 32)
FORWARD_BATCHES = (4, 8, 16, 32)

# ---- children: each runs in a fresh process -----------------------------------------


def _paths(manifest: str) -> list[str]:
    return [line for line in Path(manifest).read_text().splitlines() if line.strip()]


def child_hf(model: str, manifest: str, batch_size: int) -> None:
    """transformers.pipeline over the files, lazily; prints the first result's time."""
    from transformers import pipeline

    pipe = pipeline("image-classification", model=model, device="cpu")
    done = 0
    lazy: Any = (p for p in _paths(manifest))  # a generator: results come as they are ready
    for _ in pipe(lazy, batch_size=batch_size, top_k=5):
        if done == 0:
            print("BENCH_FIRST", time.time(), flush=True)
        done += 1
    print("BENCH_OK", done)


def child_hf_probe(model: str, manifest: str, images: int) -> None:
    """The pipeline's best batch size on the first `images` files (after a warm-up)."""
    from transformers import pipeline

    pipe = pipeline("image-classification", model=model, device="cpu")
    paths = _paths(manifest)[:images]
    pipe(paths[:2])
    rates = {}
    for batch_size in HF_BATCHES:
        start = time.perf_counter()
        pipe(paths, batch_size=batch_size)
        rates[batch_size] = len(paths) / (time.perf_counter() - start)
    print("BENCH_PROBE", json.dumps(rates, separators=(",", ":")))


def native_model(name: str, model_dir: str) -> tuple[Any, dict[str, Any]]:
    """The native implementation of the architecture: (class, constructor params)."""
    if name == "default":
        import timm

        return timm.create_model, {"model_name": "tf_efficientnet_lite0", "pretrained": False}
    from torchvision import models

    factory = {"mobilenet_v2": models.mobilenet_v2, "vit_b16": models.vit_b_16}[name]
    return factory, {"num_classes": 1000}


def native_state_dict(name: str, model_dir: str, target: Path) -> Path:
    """Weights for the native model: the default model's own, random for the others
    (throughput does not depend on the weights)."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    import torch

    if name == "default":
        from transformers import AutoModelForImageClassification

        hf = AutoModelForImageClassification.from_pretrained(model_dir)
        state = hf.timm_model.state_dict()
    else:
        factory, params = native_model(name, model_dir)
        torch.manual_seed(0)
        state = factory(**params).state_dict()
    torch.save(state, target)
    return target


def child_beam(name: str, model_dir: str, manifest: str, state_dict: str, output: str) -> None:
    """Beam's example as shipped, on the offline local runner our job uses."""
    import apache_beam as beam
    from apache_beam.examples.inference import pytorch_image_classification as example
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.runner import make_runner

    options = PipelineOptions([])
    pipeline = beam.Pipeline(runner=make_runner(options), options=options)
    model_class, params = native_model(name, model_dir)
    argv = ["--input", manifest, "--output", output, "--model_state_dict_path", state_dict]
    example.run(
        argv,
        model_class=model_class,
        model_params=params,
        save_main_session=False,
        test_pipeline=pipeline,
    )


def child_stage(model_dir: str, manifest: str, fast: bool) -> None:
    """Decode + preprocess on every core, pipelined with our forward pass; no Beam."""
    from concurrent.futures import ThreadPoolExecutor

    from transforms.fetch_decode import single_threaded_torch_in_this_thread
    from transforms.images.decode import decode_image
    from transforms.label import make_handler
    from transforms.model.preprocess import ImagePreprocessor
    from transforms.resolve import resolve
    from transforms.spec import LabelingSpec

    spec = resolve(LabelingSpec(model=model_dir, fast_decode=fast, device="cpu"), local=True)
    handler = make_handler(spec)
    loaded = handler.load_model()
    pre = ImagePreprocessor(spec.model_spec)
    pre.setup()
    draft = pre.draft_side if fast else None
    paths = _paths(manifest)
    batch_size = spec.batching.max_batch_size

    def load(path: str) -> Any:
        with open(path, "rb") as f:
            image = decode_image(f.read(), draft_side=draft, max_pixels=spec.max_image_pixels)
        return pre([image])[0]

    window = 8 * batch_size
    with ThreadPoolExecutor(
        os.cpu_count() or 1, initializer=single_threaded_torch_in_this_thread
    ) as pool:
        start = time.perf_counter()
        futures: list[Any] = [pool.submit(load, p) for p in paths[:window]]
        submitted, batch = len(futures), []
        for i in range(len(paths)):
            batch.append(futures[i].result())
            futures[i] = None
            if submitted < len(paths):
                futures.append(pool.submit(load, paths[submitted]))
                submitted += 1
            if len(batch) == batch_size or i == len(paths) - 1:
                loaded(batch)
                batch = []
        rate = len(paths) / (time.perf_counter() - start)
    print("BENCH_RATE", rate, batch_size)


def child_forward(name: str, model_dir: str, manifest: str, impl: str) -> None:
    """Forward-only images/s on preprocessed tensors of distinct images, best batch."""
    import numpy as np
    import torch
    from transformers import AutoModelForImageClassification

    from transforms.images.decode import decode_image
    from transforms.model.loading import ModelSpec
    from transforms.model.preprocess import ImagePreprocessor

    pre = ImagePreprocessor(ModelSpec(model_dir))
    pre.setup()
    images = [decode_image(Path(p).read_bytes()) for p in _paths(manifest)[:64]]
    pixels = np.stack(pre.pixel_values(images))
    if impl == "native":
        factory, params = native_model(name, model_dir)
        net = factory(**params).eval()
        state = Path(model_dir).parent / f"{name}-native.pth"
        net.load_state_dict(torch.load(native_state_dict(name, model_dir, state)))

        def run(x: Any) -> Any:
            return net(x)
    else:
        net = AutoModelForImageClassification.from_pretrained(model_dir).eval()

        def run(x: Any) -> Any:
            return net(pixel_values=x).logits

    convolutional = any(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    channels_last = impl == "hf_cl" or (impl == "native" and convolutional)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net.to(memory_format=memory_format)
    best = (0.0, 0)
    for batch_size in FORWARD_BATCHES:
        batches = [
            torch.from_numpy(pixels[i : i + batch_size]).contiguous(memory_format=memory_format)
            for i in range(0, len(pixels) - batch_size + 1, batch_size)
        ]
        with torch.inference_mode():
            run(batches[0])
            done, start = 0, time.perf_counter()
            while done < len(pixels) or time.perf_counter() - start < 3.0:
                run(batches[(done // batch_size) % len(batches)])
                done += batch_size
        best = max(best, (done / (time.perf_counter() - start), batch_size))
    print("BENCH_RATE", best[0], best[1])


def child_clip_forward(model_dir: str, manifest: str) -> None:
    """The image tower's forward-only ceiling (get_image_features), best batch."""
    import numpy as np
    import torch
    from transformers import AutoModel

    from transforms.images.decode import decode_image
    from transforms.model.loading import ModelSpec
    from transforms.model.preprocess import ImagePreprocessor

    pre = ImagePreprocessor(ModelSpec(model_dir))
    pre.setup()
    pixels = np.stack(
        pre.pixel_values([decode_image(Path(p).read_bytes()) for p in _paths(manifest)[:64]])
    )
    net = AutoModel.from_pretrained(model_dir).eval()
    best = (0.0, 0)
    for batch_size in FORWARD_BATCHES:
        batches = [
            torch.from_numpy(pixels[i : i + batch_size])
            for i in range(0, len(pixels) - batch_size + 1, batch_size)
        ]
        with torch.inference_mode():
            net.get_image_features(pixel_values=batches[0])
            done, start = 0, time.perf_counter()
            while done < len(pixels) or time.perf_counter() - start < 3.0:
                net.get_image_features(pixel_values=batches[(done // batch_size) % len(batches)])
                done += batch_size
        best = max(best, (done / (time.perf_counter() - start), batch_size))
    print("BENCH_RATE", best[0], best[1])


CHILDREN: dict[str, Any] = {
    "hf": child_hf,
    "hf_probe": child_hf_probe,
    "beam": child_beam,
    "stage": child_stage,
    "forward": child_forward,
    "clip_forward": child_clip_forward,
}


# ---- the parent: runs every system in a fresh process --------------------------------


def _env(malloc: bool | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env["TRANSFORMERS_VERBOSITY"] = "error"
    for key in MALLOC_ENV:
        env.pop(key, None)
    if malloc:
        env.update(MALLOC_ENV)
    return env


def _child(kind: str, *args: Any, malloc: bool | None = None) -> tuple[float, str, float]:
    """Run a child; (wall seconds, stdout, start time as time.time())."""
    cmd = [sys.executable, "-m", "benchmarks.harness", "--child", kind, *map(str, args)]
    before = _children_cpu()
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(malloc), cwd=REPO)
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    _LAST_CPU_UTIL[0] = (_children_cpu() - before) / wall / (os.cpu_count() or 1)
    return wall, proc.stdout, started


#: CPU time over wall time and cores of the last finished child.
_LAST_CPU_UTIL = [0.0]


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _value(stdout: str, key: str) -> list[str]:
    line = next(x for x in stdout.splitlines() if x.startswith(key))
    return line.split()[1:]


def run_ours(model_dir: str, manifest: str, extra: list[str]) -> dict[str, float]:
    """Our job as a user runs it; images/s from process start, first-row time, peak RSS."""
    out = Path(tempfile.mkdtemp(prefix="bench-harness-")) / "out"
    from benchmarks.throughput import OURS_AS_THE_CLI

    cmd = [sys.executable, "-c", OURS_AS_THE_CLI, "--input", manifest, "--output", str(out)]
    cmd += ["--model", model_dir, "--progress", "false", "--report", "false", *extra]
    before = _children_cpu()
    started = time.time()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO
    )
    first = None
    while proc.poll() is None:
        if first is None and out.exists() and any(out.glob("part-*.parquet")):
            first = time.time() - started
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"our job failed:\n{stderr[-3000:]}")
    summary = json.loads((out / SUMMARY_FILE).read_text())
    ok = summary["rows_by_status"]["ok"]
    return {
        "rate": ok / wall,
        "first_row_s": first if first is not None else wall,
        "peak_rss_mb": int(_value(stdout, "BENCH_PEAK_RSS_KB")[0]) / 1024,
        "ok": ok,
        "cpu_util": (_children_cpu() - before) / wall / (os.cpu_count() or 1),
    }


def run_hf(model_dir: str, manifest: str, batch_size: int, images: int) -> dict[str, float]:
    wall, stdout, started = _child("hf", model_dir, manifest, batch_size)
    ok = int(_value(stdout, "BENCH_OK")[0])
    assert ok == images, (ok, images)
    first = float(_value(stdout, "BENCH_FIRST")[0]) - started
    return {"rate": ok / wall, "first_row_s": first, "cpu_util": _LAST_CPU_UTIL[0]}


def run_beam(
    name: str, model_dir: str, manifest: str, state: Path, images: int
) -> dict[str, float]:
    output = Path(tempfile.mkdtemp(prefix="bench-beam-")) / "predictions.txt"
    wall, _, _ = _child("beam", name, model_dir, manifest, state, output)
    done = len(output.read_text().splitlines())
    assert done == images, (done, images)
    return {"rate": done / wall, "cpu_util": _LAST_CPU_UTIL[0]}


def profile_ours(model_dir: str, manifest: str) -> dict[str, float]:
    """py-spy samples of our exact job (all threads, idle excluded), by stage."""
    out = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    raw = out / "profile.txt"
    import shutil

    beside = Path(sys.executable).parent / "py-spy"
    spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if spy is None:
        raise RuntimeError("--profile needs py-spy: pip install -e '.[bench]'")
    cmd = [spy, "record", "--format", "raw", "--rate", "50", "--subprocesses"]
    cmd += ["--output", str(raw), "--", sys.executable, "-m", "pipelines.label_images"]
    cmd += ["--input", manifest, "--output", str(out / "job"), "--model", model_dir]
    cmd += ["--progress", "false", "--report", "false"]
    subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, check=True)
    return summarize_profile(raw.read_text())


#: Stages of a sampled stack, by the first matching frame (innermost first).
_STAGES = (
    (
        "preprocess (resize, normalize)",
        ("preprocess", "image_processing", "image_transforms", "torchvision/transforms"),
    ),
    ("forward pass (torch)", ("torch/nn/modules", "torch/_ops", "forward (transformers")),
    ("decode (Pillow)", ("ImageFile.py", "decode_image", "Image.py:convert", "JpegImagePlugin")),
    ("Parquet write", ("pyarrow", "output.py")),
    ("fetch (file read)", ("fetch.py",)),
    (
        "start-up (imports, model load)",
        ("<frozen importlib", "from_pretrained", "load_pretrained", "resolve (transforms/spec"),
    ),
    ("Beam overhead", ("apache_beam",)),
)


#: Innermost frames of a thread that waits (py-spy's idle detection misses these).
_WAITS = (
    "Condition.wait",
    "Event.wait",
    "Queue.get",
    "_worker (concurrent/futures/thread.py",
    "channel_spin",
    "_serve (grpc",
    "select (",
    "Thread.run (threading.py",
    "_wait_once",
)


def summarize_profile(text: str) -> dict[str, float]:
    """Share of busy samples per stage, from py-spy's collapsed stacks; samples of
    threads that only wait are counted apart (`waiting`, as a share of all)."""
    totals: Counter[str] = Counter()
    waiting = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if any(w in frames[-1] for w in _WAITS):
            waiting += int(count)
            continue
        stage = "other"
        for frame in reversed(frames):
            found = next((s for s, needles in _STAGES if any(n in frame for n in needles)), None)
            if found:
                stage = found
                break
        totals[stage] += int(count)
    busy = sum(totals.values()) or 1
    shares = {stage: round(100.0 * n / busy, 1) for stage, n in totals.most_common()}
    shares["waiting (share of all samples)"] = round(100.0 * waiting / (busy + waiting), 1)
    return shares


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def bench_model(name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from benchmarks.corpus import build_corpus, write_manifest
    from benchmarks.throughput import build_model

    model_dir = build_model(name, root / "models")
    paths = build_corpus(args.images, kind=args.corpus)
    manifest = str(write_manifest(paths, root / f"harness-{args.corpus}-{args.images}.txt"))
    state = native_state_dict(name, model_dir, root / "models" / f"{name}-native.pth")
    _, probe, _ = _child("hf_probe", model_dir, manifest, min(args.probe_images, args.images))
    probe_rates = {int(k): v for k, v in json.loads(_value(probe, "BENCH_PROBE")[0]).items()}
    hf_batch = max(probe_rates, key=lambda b: probe_rates[b])
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in ("exact", "fast", "hf", "beam")}
    for _ in range(args.rounds):
        runs["exact"].append(run_ours(model_dir, manifest, []))
        runs["fast"].append(run_ours(model_dir, manifest, ["--fast-decode"]))
        runs["hf"].append(run_hf(model_dir, manifest, hf_batch, args.images))
        runs["beam"].append(run_beam(name, model_dir, manifest, state, args.images))
    stage = {}
    for mode in ("exact", "fast"):
        _, out, _ = _child("stage", model_dir, manifest, mode == "fast")
        stage[mode] = float(_value(out, "BENCH_RATE")[0])
    ceilings: dict[str, float] = {}
    for impl in ("hf", "hf_cl", "native"):
        for malloc in (False, True):
            _, out, _ = _child("forward", name, model_dir, manifest, impl, malloc=malloc)
            rate, batch = _value(out, "BENCH_RATE")
            ceilings[f"{impl}{' +malloc' if malloc else ''} (batch {batch})"] = float(rate)
    result: dict[str, Any] = {
        "model": name,
        "corpus": args.corpus,
        "images": args.images,
        "rounds": args.rounds,
        "hf_batch": hf_batch,
        "hf_probe": probe_rates,
        "runs": runs,
        "rate": {k: _median([r["rate"] for r in v]) for k, v in runs.items()},
        "first_row_s": {
            k: _median([r["first_row_s"] for r in v]) for k, v in runs.items() if k != "beam"
        },
        "peak_rss_mb": _median([r["peak_rss_mb"] for r in runs["exact"]]),
        "cpu_util": {k: _median([r["cpu_util"] for r in v]) for k, v in runs.items()},
        "stage": stage,
        "ceilings": ceilings,
        "ceiling": max(ceilings.values()),
    }
    if args.profile:
        result["profile_exact"] = profile_ours(model_dir, manifest)
    return result


def goals(result: dict[str, Any]) -> list[tuple[str, float, float, bool]]:
    """(goal, measured, target, met) for one model's results."""
    rate = result["rate"]
    peer = max(rate["hf"], rate["beam"])
    checks = [
        ("exact / best peer", rate["exact"] / peer, 1.5),
        ("exact / exact stage limit", rate["exact"] / result["stage"]["exact"], 0.85),
        ("fast / best peer", rate["fast"] / peer, 2.5),
        ("fast / forward ceiling", rate["fast"] / result["ceiling"], 0.6),
        (
            "transformers first row / ours (exact)",
            result["first_row_s"]["hf"] / result["first_row_s"]["exact"],
            1.0,
        ),
    ]
    return [(name, value, target, value >= target) for name, value, target in checks]


def print_model(result: dict[str, Any]) -> None:
    from benchmarks.common import table

    rate = result["rate"]
    peer = max(rate["hf"], rate["beam"])
    runs = result["runs"]
    rows = [
        (
            "images, rounds",
            f"{result['images']} real photos ({result['corpus']}), {result['rounds']}",
        ),
        (
            "CPU utilization (exact, fast, transformers, Beam)",
            ", ".join(f"{result['cpu_util'][k]:.0%}" for k in ("exact", "fast", "hf", "beam")),
        ),
        (
            "ours, exact (default)",
            f"{rate['exact']:6.1f}  {[round(r['rate'], 1) for r in runs['exact']]}",
        ),
        (
            "ours, --fast-decode",
            f"{rate['fast']:6.1f}  {[round(r['rate'], 1) for r in runs['fast']]}",
        ),
        (
            f"transformers.pipeline (batch {result['hf_batch']})",
            f"{rate['hf']:6.1f}  {[round(r['rate'], 1) for r in runs['hf']]}",
        ),
        (
            "Beam's pytorch_image_classification",
            f"{rate['beam']:6.1f}  {[round(r['rate'], 1) for r in runs['beam']]}",
        ),
        ("exact stage limit (no Beam)", f"{result['stage']['exact']:6.1f}"),
        ("fast stage limit (no Beam)", f"{result['stage']['fast']:6.1f}"),
    ]
    rows += [(f"forward ceiling: {k}", f"{v:6.1f}") for k, v in result["ceilings"].items()]
    rows += [
        ("exact / best peer", f"{rate['exact'] / peer:5.2f}x"),
        ("fast / best peer", f"{rate['fast'] / peer:5.2f}x"),
        (
            "first output row, s (exact, fast, transformers)",
            ", ".join(f"{result['first_row_s'][k]:.1f}" for k in ("exact", "fast", "hf")),
        ),
        ("peak RSS of ours (exact), MB", f"{result['peak_rss_mb']:.0f}"),
    ]
    if "profile_exact" in result:
        rows.append(("py-spy, ours exact (% of CPU samples)", json.dumps(result["profile_exact"])))
    print(f"\n== {result['model']} (images/s, whole processes, median of rounds) ==")
    print(table(rows))
    print("  goals:")
    for name, value, target, met in goals(result):
        print(f"    {'MET ' if met else 'MISS'}  {name}: {value:.2f} (goal >= {target})")


def markdown(results: dict[str, Any]) -> str:
    """The README's table, regenerated from one run."""
    lines = [
        f"Machine: {results['machine']}.",
        "",
        "| model | images × rounds | ours exact | ours `--fast-decode` | transformers.pipeline "
        "(best batch) | Beam's example | exact stage limit | fast stage limit | forward "
        "ceiling | exact / best peer | fast / best peer | exact / stage limit | fast / "
        "ceiling | first row, s (ours, transformers) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        rate, peer = r["rate"], max(r["rate"]["hf"], r["rate"]["beam"])
        best = max(r["ceilings"], key=lambda k: r["ceilings"][k])
        lines.append(
            f"| {r['model']} | {r['images']} × {r['rounds']} | {rate['exact']:.1f} | "
            f"{rate['fast']:.1f} | {rate['hf']:.1f} (B={r['hf_batch']}) | {rate['beam']:.1f} | "
            f"{r['stage']['exact']:.1f} | {r['stage']['fast']:.1f} | {r['ceiling']:.1f} "
            f"({best}) | {rate['exact'] / peer:.2f} | {rate['fast'] / peer:.2f} | "
            f"{rate['exact'] / r['stage']['exact']:.2f} | {rate['fast'] / r['ceiling']:.2f} | "
            f"{r['first_row_s']['exact']:.1f}, {r['first_row_s']['hf']:.1f} |"
        )
    return "\n".join(lines)


def rss_goal(root: Path) -> dict[str, float]:
    from benchmarks.corpus import build_corpus, write_manifest
    from benchmarks.throughput import build_model

    model_dir = build_model("default", root / "models")
    peaks = {}
    for count in (400, 4000):
        manifest = str(write_manifest(build_corpus(count), root / f"harness-{count}.txt"))
        peaks[count] = run_ours(model_dir, manifest, [])["peak_rss_mb"]
    return {"400": peaks[400], "4000": peaks[4000], "ratio": peaks[4000] / peaks[400]}


def zero_shot_goal(root: Path, images: int) -> dict[str, float]:
    from benchmarks.corpus import build_corpus, write_manifest
    from benchmarks.zero_shot import clip_b32, imagenet_labels

    labels = imagenet_labels()
    model_dir = str(clip_b32(root / "clip-vit-b32-random", labels))
    label_file = root / "labels-1000.txt"
    label_file.write_text("\n".join(labels[:1000]) + "\n")
    manifest = str(write_manifest(build_corpus(images), root / f"harness-zs-{images}.txt"))
    ours = run_ours(model_dir, manifest, ["--candidate-labels-file", str(label_file)])
    _, out, _ = _child("clip_forward", model_dir, manifest, malloc=True)
    ceiling = float(_value(out, "BENCH_RATE")[0])
    return {"ours": ours["rate"], "image_tower_ceiling": ceiling, "ratio": ours["rate"] / ceiling}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        kind, *rest = argv[1:]
        CHILDREN[kind](*_child_args(kind, rest))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--corpus", default="mixed", choices=("mixed", "imagenet"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--probe-images", type=int, default=96)
    parser.add_argument("--rss", action="store_true", help="also the 400 vs 4,000 RSS goal")
    parser.add_argument("--zero-shot", action="store_true", help="also the zero-shot goal")
    parser.add_argument("--zero-shot-images", type=int, default=200)
    parser.add_argument("--profile", action="store_true", help="py-spy profile of ours, exact")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    from benchmarks.common import describe_machine
    from transforms.model.default_model import cache_root

    root = cache_root() / "bench"
    root.mkdir(parents=True, exist_ok=True)
    print(f"Machine: {describe_machine()}")
    results: dict[str, Any] = {"machine": describe_machine(), "models": []}
    for name in args.models.split(","):
        result = bench_model(name, args, root)
        results["models"].append(result)
        print_model(result)
    if args.rss:
        results["rss"] = rss = rss_goal(root)
        met = "MET " if rss["ratio"] <= 1.15 else "MISS"
        print(f"\n  {met} peak RSS 4,000 / 400 images: {rss['ratio']:.2f} (goal <= 1.15; {rss})")
    if args.zero_shot:
        results["zero_shot"] = zs = zero_shot_goal(root, args.zero_shot_images)
        met = "MET " if zs["ratio"] >= 0.85 else "MISS"
        print(
            f"  {met} zero-shot 1,000 labels / image tower: {zs['ratio']:.2f} (goal >= 0.85; {zs})"
        )
    print("\n" + markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _child_args(kind: str, rest: list[str]) -> list[Any]:
    if kind in ("hf", "hf_probe"):
        return [rest[0], rest[1], int(rest[2])]
    if kind == "stage":
        return [rest[0], rest[1], rest[2] == "True"]
    return list(rest)


if __name__ == "__main__":
    main()
