from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stm_ray.cli import build_parser, main


def test_help_lists_commands_and_explains_overrides():
    text = build_parser().format_help()
    for cmd in ("demo", "run", "report", "evaluate", "queries", "synthesize", "teacher", "train", "tune-prompts", "merge", "serve",
                "config", "data"):
        assert cmd in text
    assert "key=value" in text and "beir:DIR" in text and "docs:SOURCE" in text and "minilm" in text


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "stm_ray.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("stm-ray ")


def test_errors_are_one_line_with_exit_2(capsys):
    assert main(["evaluate", "--task", "nope:x", "--model", "minilm"]) == 2
    assert "unknown task 'nope:x'" in capsys.readouterr().err


def test_demo_config_is_two_clinical_areas_offline():
    from stm_ray.cli import demo_config_path
    from stm_ray.config import load_config
    from stm_ray.data import load_task

    cfg = load_config(str(demo_config_path()))
    assert cfg.run_dir == "runs/demo" and cfg.model.name_or_path == "minilm" and cfg.synth.generator == "smollm2"
    assert cfg.synth.expert_by == "task" and len(cfg.data.tasks) == 2
    real, docs = cfg.data.tasks
    assert real.startswith("icd10:") and docs.startswith("docs:icd10:")  # real queries / documents only
    chapters = [set(t.removeprefix("docs:").removeprefix("icd10:").split(",")) for t in cfg.data.tasks]
    assert not chapters[0] & chapters[1]
    task = load_task(real)
    assert len(task.split("test")) > 100 and len(task.split("dev")) > 100
    task = load_task(docs)  # the corpus and the real test split only: its train queries are never read
    assert list(task.qrels) == ["test"] and len(task.split("test")) > 100 and cfg.queries.real_test
    assert "demo.yaml" in build_parser()._subparsers._group_actions[0].choices["demo"].format_help()


# The demo's own config, shrunk to minutes: two small clinical areas (401 and 471 codes, 39 and 37 test queries; the
# second one's queries written by SmolLM2 for 24 codes), few rows, BM25 mining only (dense mining is tests/test_synth_ray.py's), four LLM negatives per area, two trials per search. The real engine (SmolLM2 on vLLM) and the real MiniLM.
DEMO_SMALL = ["data.tasks=[icd10:3,docs:icd10:10]", "queries.max_documents=24", "synth.miners=[bm25]", "synth.max_rows=48", "synth.synthetic_max_rows=4",
              "synth.max_new_tokens=32", "synth.instruction_pool_size=1", "train.batch_size=16",
              "search.num_samples=2", "search.dev_max_queries=20", "search.dev_corpus_size=200", "merge.num_samples=2"]


def test_demo_command_runs_the_main_job_and_prints_the_table(tmp_path):
    """`stm-ray demo` itself, as a user runs it (its own process, its own local Ray), on the built-in config."""
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "stm_ray.cli", "demo", "--no-progress", "--run-dir",
                           str(tmp_path / "run"), *DEMO_SMALL], capture_output=True, text=True, timeout=1200, env=env)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-6000:]
    table = out[out.index("NDCG@10 on the test split:"):]
    header = table.splitlines()[1]
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:2] == ["task", "base"] and cols[-1] == "merged"
    assert sorted(cols[2:-1]) == ["expert-docs-icd10-10", "expert-icd10-3"]
    rows = {line.split("|")[1].strip(): [float(v) for v in line.split("|")[2:-1]] for line in table.splitlines()[3:6]}
    assert set(rows) == {"ICD-10 ch. 3", "ICD-10 ch. 10 (synthetic train, real test)", "mean"}
    assert all(0.0 < v <= 1.0 for vs in rows.values() for v in vs)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert all(manifest["stages"][n]["action"] == "ran" for n in ("queries", "synthesize", "train", "merge"))
    # evaluate ran every file, except those of an expert that finished while the other trained (eval.early): the
    # pipeline evaluated it then, on the CPU its training freed, and the stage reused those files
    items = manifest["stages"]["evaluate"]["items"]
    assert {i["action"] for i in items} <= {"run", "reuse"} and any(i["action"] == "run" for i in items)
    early = {i["item"].split(" on ")[0] for i in items if i["action"] == "reuse"}
    assert all(label.startswith("expert-") and f"evaluating {label} now" in out + proc.stderr for label in early)
    q = manifest["stages"]["queries"]["counts"]["tasks"]["docs:icd10:10"]
    assert q["generated"] == 48 and q["drops"]["engine_error"] == 0 and q["gen_tokens"] and q["test"] == "real"
    assert q["kept"] == q["generated"] - sum(q["drops"].values()) and q["kept"] > 0
    assert "synthetic queries (docs: tasks):" in out and "splits (queries): train" in out
    synth = manifest["stages"]["synthesize"]["counts"]
    assert synth["synthetic_generated"] == 8 and synth["drops_by_reason"]["engine_error"] == 0 and synth["gen_tokens"]
    assert (tmp_path / "run" / "report.md").is_file() and "report:" in out
    assert "PlacementGroupCleaner" not in proc.stderr  # Ray Train's dashboard-less cleaner stays quiet


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_runs_the_whole_loop_and_prints_the_table(tmp_path, capsys):
    assert main(["demo", "--no-progress", "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "NDCG@10 on the test split" in out and "| mean" in out and "merged" in out and "report:" in out
    manifest = __import__("json").loads((tmp_path / "run" / "manifest.json").read_text())
    assert all(s["status"] == "done" for n, s in manifest["stages"].items() if n != "serve")
    assert (tmp_path / "run" / "report" / "merge_trials.png").is_file()


REPO = Path(__file__).resolve().parents[1]


def _job(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(REPO / "jobs" / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_job_entrypoint_evaluates_every_configured_task(tiny_bert_dir, tiny_beir, tmp_path):
    import json

    run = tmp_path / "run"
    proc = _job("evaluate.py", "jobs/configs/local.yaml", f"run_dir={run}", f"model.name_or_path={tiny_bert_dir}",
                f"data.tasks=['beir:{tiny_beir}', 'icd10:22']")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NDCG@10" in proc.stdout and "evaluate" in proc.stdout
    files = sorted(p.name for p in (run / "eval" / "base").glob("*.json"))
    assert len(files) == 2 and files[1] == "icd10_22.json"
    assert "ndcg_at_10" in json.loads((run / "eval" / "base" / "icd10_22.json").read_text())["scores"]["test"][0]
    assert json.loads((run / "manifest.json").read_text())["stages"]["evaluate"]["status"] == "done"


JOB_RUNNER = """
import io, runpy, sys, contextlib
results = {}
for job, args in [(j, a.split("|")) for j, a in (x.split("=", 1) for x in sys.argv[1:])]:
    err = io.StringIO()
    sys.argv = [job, *args]
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_path(job, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
    results[f"{job}|{'|'.join(args)}"] = (code, err.getvalue())
print(repr(results))
"""


def test_jobs_are_the_clis_entry(tmp_path):
    """A job is `stm-ray run` with its stage: the CLI's checks and one-line errors (exit 2), not a traceback, and
    nothing of its own (it imports the CLI's entry only). All jobs in one Python process (one import of stm-ray)."""
    import ast

    jobs = sorted(p.name for p in (REPO / "jobs").glob("*.py"))
    assert "pipeline.py" in jobs and len(jobs) >= 10
    missing = str(tmp_path / "missing.yaml")
    calls = []
    for job in jobs:
        tree = ast.parse((REPO / "jobs" / job).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module.startswith("stm_ray")}
        assert imported == {"stm_ray.cli"}, job
        calls += [f"jobs/{job}={missing}", f"jobs/{job}=jobs/configs/local.yaml|train.lora.r=abc"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", JOB_RUNNER, *calls], capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 - our own repr
    for job in jobs:
        code, err = results[f"jobs/{job}|{missing}"]
        assert code == 2 and err.strip().endswith(f"config file not found: {missing}"), (job, err)
        assert "Traceback" not in err
        code, err = results[f"jobs/{job}|jobs/configs/local.yaml|train.lora.r=abc"]
        assert code == 2 and "train.lora.r: Input should be a valid integer" in err, (job, err)


@pytest.mark.slow  # the train stage on Ray is tests/test_train_ray.py's; here the command's summary (~40 s)
def test_train_command_trains_and_prints_summary(ray_local, tiny_bert_dir, beir_train_dev, tmp_path, capsys):
    from tests.conftest import make_shards

    shards = make_shards(tmp_path / "shards", f"beir:{beir_train_dev}", experts=("solo",))
    args = ["train", "--no-progress", "--shards", str(shards), f"run_dir={tmp_path / 'run'}",
            f"model.name_or_path={tiny_bert_dir}", "train.batch_size=4", "train.max_steps=2", "data.dev_split=dev"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| solo " in out and "| base " in out and "dev NDCG@10" in out and "1 expert(s)" in out
    assert main(args) == 0  # a rerun finds the expert done
    assert "already done: 1" in capsys.readouterr().out


def test_train_command_errors_name_the_problem(tmp_path, capsys):
    assert main(["train", f"train.shards={tmp_path / 'none'}"]) == 2
    assert "no such shard folder" in capsys.readouterr().err
    assert main(["train", "train.batch_size=5", "train.num_workers=2"]) == 2
    assert "multiple of num_workers" in capsys.readouterr().err


def test_synthesize_command_errors_name_the_problem(tiny_beir, capsys):
    assert main(["synthesize", "synth.engine=openai"]) == 2
    assert "engine 'openai' needs base_url" in capsys.readouterr().err
    assert main(["synthesize", f"data.tasks=[beir:{tiny_beir}]", "data.train_split=test",
                 "synth.expert_by=chapter"]) == 2
    assert "synth.expert_by: task" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "stm_ray.cli", "synthesize", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "ray.data.llm" in out and "OPENAI_API_KEY" in out


@pytest.mark.slow  # ~2 min; the searches are tests/test_tune_ray.py's, the commands' errors stay in the fast tier
def test_merge_then_tune_prompts_commands(ray_local, tiny_bert_dir, beir_train_dev, tmp_path, capsys):
    from tests.test_tune_ray import _make_experts

    run = tmp_path / "run"
    _make_experts(tiny_bert_dir, run)
    common = [f"run_dir={run}", f"data.tasks=[beir:{beir_train_dev}]", f"model.name_or_path={tiny_bert_dir}"]
    assert main(["merge", "--no-progress", *common, "merge.searcher=grid", "merge.methods=[linear]",
                 "merge.weight_grid=[0.0,1.0]"]) == 0
    out = capsys.readouterr().out
    assert "| base " in out and "| expert alpha " in out and "| merged (linear)" in out
    assert "4 trials" in out and "SentenceTransformer(" in out
    assert main(["tune-prompts", "--no-progress", *common, "search.instructions=[Find the disease]"]) == 0
    out = capsys.readouterr().out
    assert "Find the disease" in out and "(none)" in out and "best instruction:" in out
    assert f"saved: {(run / 'merged').resolve()}" in out  # tunes <run_dir>/merged by default and saves into it


def test_merge_command_errors_name_the_problem(tmp_path, capsys):
    assert main(["merge", f"run_dir={tmp_path}"]) == 2
    assert "no finished expert under" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "stm_ray.cli", "merge", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "mergekit" in out and "merge.searcher=grid" in out
