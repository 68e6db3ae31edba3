"""Serve-time sizing (tvserve/ops/sizing.py): the plan's rules on made-up machines, what archives
record about their sizes, and a real TorchServe sized for a GPU it does not have (TVSERVE_GPUS=1:
its workers run on the CPU, which is enough to check what TorchServe registered), beside one
started as before on this CPU machine."""

import os

import pytest
import requests

from helpers import GATED_MODEL, REPO, run_tvserve, write_custom_model
from handlers.budget import CPUS_ENV, thread_budget
from handlers.record import SIZES, MeasuredLoad, Record, Sizing
from tvserve import TvserveError
from tvserve.archiving.mar import read_model_config, read_record
from tvserve.archiving.options import ArchiveOptions
from tvserve.archiving.sources import archive_custom
from tvserve.ops.client import bearer, read_keys
from tvserve.ops.management import model_versions
from tvserve.archiving.measured_load import POINT_S, SHARED_WORKERS, choose, rate, shapes_for, share
from tvserve.ops.properties import PRODUCTION_CONFIG, free_ports_config, read_properties
from tvserve.ops.server import SIZED_CONFIG, Server
from tvserve.ops.sizing import (GPU_BATCH, GPU_BATCH_DELAY_MS, GPU_BATCH_OTHERS, GPUS_ENV, WORKERS_PER_GPU, Machine,
                                Plan, Size, archived_sizes, gpu_count, model_snapshot, plan_sizes)

ARCHIVED = archived_sizes({"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 1}, default_workers=1)


def measured_load(workers: int, threads: int) -> MeasuredLoad:
    """A load measured on 2 cores whose winner is `workers` x `threads`."""
    candidates = [{"workers": 1, "threads": 2, "batch_size": 8, "c1_p50_ms": 30.0, "load_rps": 40.0},
                  {"workers": 2, "threads": 1, "batch_size": 1, "c1_p50_ms": 31.0, "load_rps": 50.0},
                  {"workers": 2, "threads": 2, "batch_size": 8, "c1_p50_ms": 30.5, "load_rps": 48.0}]
    chosen = next(i for i, c in enumerate(candidates) if (c["workers"], c["threads"]) == (workers, threads))
    return MeasuredLoad(concurrency=2, point_s=1.0, candidates=candidates, why="made up", chosen=chosen)


DECIDED = Sizing(decided=SIZES, cores=2, measured=measured_load(2, 1))  # a model that served best with a worker per core


def planned(machine, sizing=DECIDED, task="classification", decode="tensor") -> tuple:
    sizes = plan_sizes(ARCHIVED, sizing, task, machine, decode)
    return sizes["workers"].value, sizes["batch_size"].value, sizes["max_batch_delay"].value


@pytest.mark.parametrize("gpus, cores, workers", [(1, 2, 2), (1, 16, 2), (2, 16, 4), (8, 16, 16), (8, 2, 2)])
def test_gpu_decoding_workers_fill_the_gpus_within_the_cores(gpus, cores, workers):
    assert workers == min(WORKERS_PER_GPU * gpus, cores)
    assert planned(Machine(gpus=gpus, cores=cores)) == (workers, GPU_BATCH["classification"], GPU_BATCH_DELAY_MS)


@pytest.mark.parametrize("gpus, cores, workers", [(1, 2, 2), (1, 16, 2), (2, 16, 4), (3, 16, 6), (8, 2, 2)])
def test_pil_decoding_workers_are_as_many_and_prepare_on_the_cores_dealt_to_them(gpus, cores, workers):
    assert planned(Machine(gpus=gpus, cores=cores), decode="pil")[0] == workers


def test_the_servers_decode_override_is_the_decoding_planned_for():
    machine = Machine(gpus=1, cores=16, decode="pil")  # TVSERVE_DECODE=pil over an archive's --gpu-decode
    workers = plan_sizes(ARCHIVED, DECIDED, "classification", machine, decode="tensor")["workers"]
    assert workers.value == WORKERS_PER_GPU and "decoded with PIL" in workers.why and "on 8 threads" in workers.why
    assert Machine.detect({"TVSERVE_GPUS": "1", "TVSERVE_CPUS": "16", "TVSERVE_DECODE": "tensor"}, {}).decode == "tensor"


@pytest.mark.parametrize("task, batch", [("classification", 32), ("semantic_segmentation", 8), ("detection", 4),
                                         ("instance_segmentation", GPU_BATCH_OTHERS), ("keypoints", GPU_BATCH_OTHERS)])
def test_gpu_batches_are_smaller_for_models_of_big_images(task, batch):
    assert planned(Machine(gpus=1, cores=16), task=task)[1] == batch


def test_cpu_keeps_the_archive_sizes_on_the_cores_they_were_decided_on():
    sizes = plan_sizes(ARCHIVED, DECIDED, "classification", Machine(gpus=0, cores=2))
    assert {name: size.value for name, size in sizes.items()} == {"workers": 1, "batch_size": 1, "max_batch_delay": 1}
    assert "measured on 2 cores, as here" == sizes["workers"].why


def test_cpu_of_other_cores_replans_the_measured_winners_shape():
    assert planned(Machine(gpus=0, cores=16)) == (8, 1, 1)  # a worker per core, at most MAX_AUTO_WORKERS
    assert planned(Machine(gpus=0, cores=4)) == (4, 1, 1)
    one_worker = Sizing(decided=SIZES, cores=2, measured=measured_load(1, 2))
    workers = plan_sizes(ARCHIVED, one_worker, "classification", Machine(gpus=0, cores=16))["workers"]
    assert workers.value == 1 and "keeps one worker, with 16 threads here" in workers.why
    unmeasured = plan_sizes(ARCHIVED, Sizing(decided=SIZES, cores=2), "classification", Machine(gpus=0, cores=16))["workers"]
    assert unmeasured.value == 1 and "without a measured load: kept" in unmeasured.why


@pytest.mark.parametrize("gpus, cores", [(0, 2), (0, 16), (1, 2), (1, 16), (2, 16), (8, 16)])
def test_given_sizes_and_older_archives_are_never_resized(gpus, cores):
    machine = Machine(gpus=gpus, cores=cores)
    assert planned(machine, sizing=Sizing(decided=(), cores=2)) == (1, 1, 1)
    assert planned(machine, sizing=None) == (1, 1, 1)  # a record from before sizing was recorded
    mixed = plan_sizes(ARCHIVED, Sizing(decided=("workers", "max_batch_delay"), cores=2), "classification", machine)
    assert mixed["batch_size"].value == 1 and mixed["batch_size"].why == "given when archived"


def test_old_records_read_without_sizing_and_new_ones_round_trip():
    record = Record.from_dict({"name": "m", "source": "custom", "model": {"builder": "torchvision", "name": "m"},
                               "preset": {}, "labels": ["a"]})
    assert record.sizing is None
    record.sizing = Sizing(decided=("batch_size",), cores=4)
    assert Record.from_json(record.to_json()).sizing == record.sizing
    record.sizing = DECIDED  # with the load it was measured by
    assert Record.from_json(record.to_json()).sizing == DECIDED and DECIDED.measured.winner()["workers"] == 2


def test_gpu_count_prefers_the_override_then_caps_what_is_visible_by_number_of_gpu():
    assert gpu_count({GPUS_ENV: "8", "CUDA_VISIBLE_DEVICES": "0"}, {}) == (8, GPUS_ENV)
    assert gpu_count({"CUDA_VISIBLE_DEVICES": "0,1,2"}, {})[0] == 3
    assert gpu_count({"CUDA_VISIBLE_DEVICES": "0,1,2"}, {"number_of_gpu": "2"})[0] == 2
    assert gpu_count({"CUDA_VISIBLE_DEVICES": "0,1,2"}, {"number_of_gpu": "0"})[0] == 0
    assert Machine.detect({GPUS_ENV: "1", "TVSERVE_CPUS": "16"}, {}) == Machine(gpus=1, cores=16, gpus_from=GPUS_ENV)


@pytest.fixture(scope="module")
def sized_store(tmp_path_factory):
    """Three archives of one tiny model (eager, so nothing but workers and batching is measured):
    `tiny` leaves every size to the archiver, its version 2.0 gives them all, and `tiny_given`
    gives its batch size only."""
    folder = tmp_path_factory.mktemp("sizing")
    write_custom_model(folder / "model", "tiny", GATED_MODEL, "Gated", ["a", "b"])
    store = folder / "model_store"

    def archive(**options):
        return archive_custom(model_file=folder / "model" / "tiny.py", class_name="Gated", init_args="{}",
                              weights=folder / "model" / "tiny.pt", labels=folder / "model" / "labels.txt",
                              resize=8, crop=8, mean="0.5,0.5,0.5", std="0.25,0.25,0.25",
                              options=ArchiveOptions(export_path=store, backend="eager", **options))

    archive(model_name="tiny")
    archive(model_name="tiny", version="2.0", workers=1, batch_size=2, max_batch_delay=7)
    archive(model_name="tiny_given", batch_size=4)
    return store


@pytest.mark.parametrize("delay", [0, -5])
def test_a_batch_delay_under_1_ms_is_refused_since_torchserve_reads_0_as_100(delay):
    with pytest.raises(TvserveError, match=rf"--max-batch-delay is at least 1 ms, got {delay}: TorchServe 0.12 reads 0 "
                       "as unset and waits its default 100 ms"):
        ArchiveOptions(model_name="tiny", max_batch_delay=delay)


def test_archives_record_which_sizes_were_decided(sized_store):
    sizing = read_record(sized_store / "tiny.mar").sizing
    assert (sizing.decided, sizing.cores) == (SIZES, os.cpu_count())
    winner = sizing.measured.winner()  # the load it was sized by (test_backends.py checks its candidates)
    assert read_model_config(sized_store / "tiny.mar")["batchSize"] == winner["batch_size"]
    assert read_record(sized_store / "tiny-2.0.mar").sizing.decided == ()
    assert read_record(sized_store / "tiny-2.0.mar").sizing.measured is None
    assert read_record(sized_store / "tiny_given.mar").sizing.decided == ("workers", "max_batch_delay")
    assert read_model_config(sized_store / "tiny_given.mar")["maxBatchDelay"] == 1  # the archive default


def registered(server) -> dict:
    """{(model, version): (minWorkers, maxWorkers, workers running, batchSize, maxBatchDelay)} as
    the management API describes them."""
    versions = model_versions(server.management_url, server.keys().get("management"))
    return {(name, v["modelVersion"]): (v["minWorkers"], v["maxWorkers"], len(v["workers"]), v["batchSize"],
                                        v["maxBatchDelay"]) for name, described in versions.items() for v in described}


def test_a_gpu_plan_is_what_torchserve_registers_without_the_management_api(tmp_path, sized_store):
    """The production configuration (no model API): TorchServe takes the planned sizes from the
    model_snapshot of the server's config copy, every version, the default as it would choose."""
    config = free_ports_config(PRODUCTION_CONFIG, tmp_path / "production.properties")
    with Server(model_store=sized_store, config=config, workdir=tmp_path / "server",
                env={GPUS_ENV: "1", "TVSERVE_CPUS": "2"}) as server:
        assert "model_snapshot=" in (tmp_path / "server" / SIZED_CONFIG).read_text()
        assert server.threads_per_worker() == 1  # 2 cores shared by 2 + 1 + 2 workers
        sizes = registered(server)
        default = next(plan.version for plan in server.plans if plan.name == "tiny")  # the first listed
        described = server_describe(server, "tiny")
    assert sizes == {("tiny", "1.0"): (2, 2, 2, 32, GPU_BATCH_DELAY_MS),
                     ("tiny", "2.0"): (1, 1, 1, 2, 7),
                     ("tiny_given", "1.0"): (2, 2, 2, 4, GPU_BATCH_DELAY_MS)}
    assert described["modelVersion"] == default
    assert described["loadedAtStartup"] is False  # TorchServe's flag for load_models, not snapshots


def server_describe(server, model: str) -> dict:
    """The management API's description of `model`'s default version."""
    response = requests.get(f"{server.management_url}/models/{model}", headers=bearer(server.keys().get("management")),
                            timeout=10)
    response.raise_for_status()
    return response.json()[0]


def test_without_gpus_serve_starts_as_before_and_prints_each_plan(tmp_path, sized_store):
    env = {GPUS_ENV: "", "TVSERVE_CPUS": str(os.cpu_count())}
    if Machine.detect({**os.environ, **env}, {}).gpus:
        pytest.skip("this machine has a GPU: the CPU start is checked on machines without one")
    config = free_ports_config(REPO / "config.properties", tmp_path / "config.properties")
    workdir = tmp_path / "w"
    started = run_tvserve("serve", "--model-store", sized_store, "--config", config, "--workdir", workdir, "--detach",
                          env=env)
    try:
        assert started.returncode == 0, started.stderr
        assert f"Sized for no GPU, {os.cpu_count()} cores:" in started.stdout
        assert "tiny_given 1.0: " in started.stdout and "batch 4 (given when archived)" in started.stdout
        assert not (workdir / SIZED_CONFIG).exists()
        console = f"{read_properties(config)['inference_address']}/console/"  # `make serve` prints the console's address
        assert f"console:    {console}" in started.stdout
        assert "<title>tvserve console</title>" in requests.get(console, timeout=10).text
        versions = model_versions(read_properties(config)["management_address"], read_keys(workdir).get("management"))
    finally:
        run_tvserve("stop", "--workdir", workdir)
    for name, described in versions.items():
        for v in described:
            mar = sized_store / (f"{name}.mar" if v["modelVersion"] == "1.0" else f"{name}-{v['modelVersion']}.mar")
            config_of = read_model_config(mar)
            assert (v["minWorkers"], v["batchSize"], v["maxBatchDelay"]) == \
                (config_of["minWorkers"], config_of["batchSize"], config_of["maxBatchDelay"])


def test_snapshot_makes_each_models_first_version_its_default():
    class P:
        def __init__(self, name, version):
            self.name, self.version = name, version

        def snapshot_entry(self, default):
            return {"defaultVersion": default}

    snapshot = model_snapshot([P("a", "2.0"), P("a", "1.0"), P("b", "1.0")], created_ms=0)
    assert snapshot["modelCount"] == 3
    assert snapshot["models"] == {"a": {"2.0": {"defaultVersion": True}, "1.0": {"defaultVersion": False}},
                                  "b": {"1.0": {"defaultVersion": True}}}


def test_the_measured_winner_is_the_fastest_at_load_of_those_near_the_fastest_alone():
    candidates = [{"workers": 1, "c1_p50_ms": 20.0, "load_rps": 30.0}, {"workers": 1, "c1_p50_ms": 21.5, "load_rps": 45.0},
                  {"workers": 2, "c1_p50_ms": 23.0, "load_rps": 90.0}]  # the last is 15% slower alone: not eligible
    chosen, why = choose(candidates)
    assert chosen == 1 and "2 of 3 candidates" in why and "within 10%" in why
    assert choose(candidates[:1])[0] == 0


def test_near_equal_at_load_the_most_workers_win_then_the_most_req_s():
    one = {"workers": 1, "c1_p50_ms": 25.0, "load_rps": 50.0}
    shared = {"workers": 2, "c1_p50_ms": 25.5, "load_rps": 48.0}  # 4% fewer req/s: equal
    assert choose([one, shared])[0] == 1 and "the 2 within 5%" in choose([one, shared])[1]
    assert choose([one, {**shared, "load_rps": 47.0}])[0] == 0  # 6% fewer: not equal
    batched = {**shared, "load_rps": 49.0}
    assert choose([one, shared, batched])[0] == 2  # two workers each: the most req/s
    assert choose([one, shared, {**shared}])[0] == 1  # equal in both: the first listed


def test_a_worker_of_the_shared_shape_gets_every_core_where_no_tvserve_server_sets_its_threads(monkeypatch):
    """Under a TorchServe that tvserve did not start (KServe's runtime), two workers that take turns
    on every core each get every core, not half; the server's TVSERVE_THREADS and a pinned
    handler.threads still come first."""
    monkeypatch.delenv("TVSERVE_THREADS", raising=False)
    monkeypatch.setenv(CPUS_ENV, "4")
    config = {"minWorkers": 2, "maxWorkers": 2}
    assert thread_budget(config) == 2 and thread_budget(config, shares_cores=True) == 4
    assert thread_budget({**config, "handler": {"threads": 1}}, shares_cores=True) == 1
    monkeypatch.setenv("TVSERVE_THREADS", "3")
    assert thread_budget(config, shares_cores=True) == 3


@pytest.mark.parametrize("queued, free, batch, takes", [
    (2, 2, 8, 1), (4, 2, 8, 2), (5, 2, 8, 3), (16, 2, 8, 8), (3, 1, 8, 3), (3, 1, 1, 1), (1, 2, 8, 1)])
def test_requests_sent_at_once_are_shared_among_the_free_measuring_workers(queued, free, batch, takes):
    assert share(queued, free, batch) == takes


def test_a_points_rate_is_each_workers_requests_between_its_answers_not_whole_requests_a_point():
    assert rate([(10.0, 2), (10.04, 2), (10.08, 2)]) == pytest.approx(4 / 0.08)  # 50 req/s, not 6 in 0.5 s
    assert rate([(10.0, 3)]) == 3 / POINT_S and rate([]) == 0


@pytest.mark.parametrize("cores, given, shapes", [
    (2, {}, [(1, 2), (2, 1), (SHARED_WORKERS, 2)]),
    (16, {}, [(1, 16), (8, 2), (SHARED_WORKERS, 16)]),
    (1, {}, [(1, 1)]),
    (2, {"threads": 3}, [(1, 3), (2, 3)]),  # threads given: no shared shape
    (4, {"workers": 3}, [(3, 1)]),
])
def test_the_shapes_measured_are_one_worker_a_worker_per_core_and_two_sharing_the_cores(cores, given, shapes):
    assert shapes_for(ArchiveOptions(model_name="m", **given), cores) == shapes


def test_two_workers_sharing_the_cores_stay_two_and_claim_one_workers_cores():
    shared = Sizing(decided=SIZES, cores=2, measured=measured_load(2, 2))
    assert shared.shares_cores() and not DECIDED.shares_cores()
    archived = {**ARCHIVED, "workers": 2}
    for cores in (2, 16):
        workers = plan_sizes(archived, shared, "classification", Machine(gpus=0, cores=cores))["workers"]
        assert workers.value == 2
        assert cores == 2 or "keeps its 2 workers sharing every core" in workers.why
    plan = Plan(name="m", version="1.0", mar=REPO / "m.mar", workers=Size(2, "measured"), batch_size=Size(8, ""),
                max_batch_delay=Size(1, ""), archived=archived, shares_cores=True)
    assert plan.cores_claimed == 1 and "sharing every core" in plan.line()
    assert plan.__class__(**{**plan.__dict__, "shares_cores": False}).cores_claimed == 2


def test_the_side_by_side_tool_serves_copies_sized_as_asked(tmp_path):
    """tvserve/tools/sizings.py: WxTbB[dD] parsed (-rigid: elastic threads off), refused in any other form,
    and written into a copy's model-config.yaml (threads pinned), every other member kept."""
    import zipfile
    from tvserve.tools.sizings import parse_sizing, server_env, sized_copy
    assert parse_sizing("2x2b8") == parse_sizing("2x2b8-rigid") == (2, 2, 8, 1)
    assert parse_sizing("2x2b8d0-rigid") == (2, 2, 8, 0)
    assert server_env("2x2b8") == {} and server_env("2x2b8-rigid") == {"TVSERVE_ELASTIC": "off"}
    with pytest.raises(TvserveError, match="WORKERSxTHREADSbBATCH"):
        parse_sizing("2 workers")
    mar = tmp_path / "m.mar"
    with zipfile.ZipFile(mar, "w") as archive:
        archive.writestr("model-config.yaml", "minWorkers: 1\n")
        archive.writestr("weights.pt", b"\x00weights")
    store = sized_copy(mar, tmp_path / "store", (2, 2, 8, 0))
    config = read_model_config(store / "m.mar")
    assert (config["minWorkers"], config["maxWorkers"], config["batchSize"], config["maxBatchDelay"],
            config["handler"]["threads"]) == (2, 2, 8, 0, 2)
    assert zipfile.ZipFile(store / "m.mar").read("weights.pt") == b"\x00weights"
