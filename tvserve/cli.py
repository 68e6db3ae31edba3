"""The `tvserve` command: train, archive, serve, predict and describe image models (classification,
detection, segmentation, keypoints), video classifiers and optical flow.

Examples:
    tvserve archive torchvision resnet18                 # ImageNet weights: download, cache or --weights-file
    tvserve archive checkpoint runs/digits_net/checkpoint.pt
    tvserve archive checkpoint runs/digits_net/checkpoint.pt --name digits_int8 --precision int8 --calibration my_digits/
    tvserve serve                                        # every archive in model_store/, until Ctrl-C
    tvserve predict digits_net samples/7-dark-on-white.png --topk 3   # make serve's model; samples/README.md
    tvserve predict resnet18 samples/photo.jpg --topk 3
    tvserve predict maskrcnn_resnet50_fpn samples/photo.jpg --threshold 0.7 --draw drawn/
    tvserve predict r3d_18 samples/pan.mp4 --topk 3 --draw drawn/
    tvserve predict raft_small samples/pan-1.png samples/pan-2.png --pairs --draw drawn/
    tvserve describe model_store/resnet18.mar
    tvserve zoo
    tvserve export kserve kserve-models/                 # KServe's storage layout from model_store/
"""

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

from training.errors import TrainingError
from tvserve import TvserveError
from tvserve.ops import client
from tvserve.ops.properties import DEVELOPMENT_CONFIG, PRODUCTION_CONFIG

log = logging.getLogger("tvserve")

DEFAULT_WORKDIR = Path(".tvserve")  # logs, temp files, API keys and the running server's state
DEFAULT_MODEL_STORE = Path("model_store")  # the current folder's


def add_archive_options(parser):
    """Flags left out keep ArchiveOptions' defaults (tvserve/archiving/options.py), the one place they are set."""
    group = parser.add_argument_group("archive options")
    group.add_argument("--name", dest="model_name", help="model name (default: the model's own)")
    group.add_argument("--version", help="default 1.0")
    group.add_argument("--export-path", type=Path, help="default model_store")
    group.add_argument("--force", action="store_true", help="overwrite an existing archive")
    group.add_argument("--workers", type=int, help="default: measured here, one per core for a model cheaper than "
                       "decoding a photo, else one with every core's threads")
    group.add_argument("--batch-size", type=int, help="requests a worker takes together (default 8: its pipeline "
                       "decodes the later ones while the earlier ones run the forward)")
    group.add_argument("--max-batch-delay", type=int, help="ms a batch waits for more requests (default 1, at least 1)")
    group.add_argument("--response-timeout", type=int, help="s (default 120)")
    group.add_argument("--startup-timeout", type=int, help="s (default 120)")
    group.add_argument("--threads", type=int, help="threads per worker (default: cores / workers)")
    group.add_argument("--backend", help="a runtime by name: eager, eager_channels_last, torchscript, onnxruntime, "
                       "openvino (default auto: the fastest here whose answers are within the task's parity "
                       "tolerance of eager, 1e-4 for probabilities)")
    group.add_argument("--jpeg-draft", action="store_true",
                       help="lossy: decode big JPEGs at a reduced DCT scale (at least twice the resize size)")
    group.add_argument("--gpu-decode", dest="decode", action="store_const", const="tensor",
                       help="lossy: decode a batch's JPEGs together (nvJPEG on a GPU, libjpeg-turbo on the CPU) and "
                       "resize, crop and normalise them as tensor ops on the worker's device; records decode: tensor "
                       "(default: PIL, exact)")
    group.add_argument("--precision", help="fp32 (default: IEEE fp32, TF32 off on a GPU), tf32, bf16, fp16 (eager "
                       "PyTorch: TF32 allowed on a GPU, autocast), or int8 (post-training static quantization, ONNX "
                       "Runtime, calibrated on --calibration); for all but fp32 the change against fp32 is measured "
                       "and recorded (docs/precision.md)")
    group.add_argument("--calibration", type=Path, help="int8: a folder of your images (a few hundred is typical; "
                       "class sub-folders named after the labels add accuracies): half calibrates, half measures; "
                       "tf32/bf16/fp16: measured on all of them (default: 16 images made here)")
    group.add_argument("--min-agreement", type=float, help="int8 is refused, tf32/bf16/fp16 warned of, below this "
                       "top-1 agreement with fp32 on the measured images (default 0.99)")


ARCHIVE_FLAGS = ("model_name", "version", "export_path", "force", "workers", "batch_size", "max_batch_delay",
                 "response_timeout", "startup_timeout", "threads", "backend", "jpeg_draft", "decode", "precision",
                 "calibration", "min_agreement")


def archive_options(args):
    from tvserve.archiving.options import ArchiveOptions

    values = {name: getattr(args, name) for name in ARCHIVE_FLAGS}
    given = {name: value for name, value in values.items() if value is not None and value is not False}  # 0 is given
    return ArchiveOptions(**given)


def cmd_archive_torchvision(args):
    from tvserve.archiving.sources import archive_torchvision

    path = archive_torchvision(args.model, weights=args.weights, weights_file=args.weights_file,
                               random_init=args.random_init, options=archive_options(args))
    print(path)


def cmd_archive_checkpoint(args):
    from tvserve.archiving.sources import archive_checkpoint

    print(archive_checkpoint(args.checkpoint, options=archive_options(args)))


def cmd_archive_custom(args):
    from tvserve.archiving.sources import archive_custom

    print(archive_custom(
        model_file=args.model_file, class_name=args.class_name, init_args=args.init_args,
        weights=args.weights, labels=args.labels, resize=args.resize, crop=args.crop,
        interpolation=args.interpolation, mean=args.mean, std=args.std, options=archive_options(args),
    ))


def side(value) -> str:
    """A preset's resize or crop as shown: 224, 128x171 (a video preset's [height, width]), or -."""
    if not value:
        return "-"
    return "x".join(map(str, value)) if isinstance(value, list) else str(value)


def cmd_zoo(args):
    from tvserve.archiving.zoo import zoo

    rows = zoo()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for task in dict.fromkeys(row["task"] for row in rows):
        task_rows = [row for row in rows if row["task"] == task]
        print(f"\n{task.replace('_', ' ')} ({len({row['model'] for row in task_rows})} models)")
        print(f"{'model':<38} {'weights':<36} {'params':>12} {'resize/crop':>11} {'interp':>8} "
              f"{task_rows[0]['metric']:>9}")
        for row in task_rows:
            value = f"{row['value']:.2f}" if row["value"] is not None else "-"
            weights = row["weights"] + (" (default)" if row["default"] else "")
            size = f"{side(row['resize']):>5}/{side(row['crop']):<5}"
            print(f"{row['model']:<38} {weights:<36} {row['params']:>12,} {size} {row['interpolation'] or '-':>8} "
                  f"{value:>9}")
    print(f"\n{len({row['model'] for row in rows})} models, {len(rows)} weights")


def cmd_register(args):
    print(client.register(args.archive, management_url=args.management_url, workers=args.workers,
                          token=keys(args).get("management")))


def cmd_set_default(args):
    print(client.set_default_version(args.model, args.model_version, management_url=args.management_url,
                                     token=keys(args).get("management")))


def cmd_health(args):
    from tvserve.ops.server import health

    ready, line = health(args.workdir)
    print(line)
    if not ready:
        raise SystemExit(1)


def cmd_evaluate(args):
    from tvserve.tools.evaluate import evaluate, format_report

    reports = evaluate(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir,
                       url=args.url, model=args.model, inverted=args.inverted)
    print(json.dumps(reports, indent=2) if args.json else "\n\n".join(map(format_report, reports)))
    if len(reports) == 2 and reports[0]["confusion_matrix"] != reports[1]["confusion_matrix"]:
        raise TvserveError("The served model does not agree with the checkpoint in-process.")


def cmd_bench(args):
    from tvserve.tools.batches import BatchRun
    from tvserve.tools.bench import SYSTEMS, BenchConfig, run, write

    config = BenchConfig(models=tuple(args.models.split(",")), images=tuple(args.images.split(",")),
                         concurrency=tuple(int(c) for c in args.concurrency.split(",")),
                         duration=args.duration, warmup=args.warmup, server_warmup=args.server_warmup,
                         out=args.out, work=args.work, http=not args.no_http, systems=tuple(args.systems.split(",")),
                         calibration=args.calibration, batches=batch_run(args))
    unknown = set(config.systems) - set(SYSTEMS)
    if unknown or "tvserve" not in config.systems:
        raise TvserveError(f"--systems takes tvserve (always) and any of {', '.join(SYSTEMS[1:])}; got {args.systems!r}.")
    if args.smoke:  # seconds: checks the harness, measures nothing worth reporting
        config.models, config.images, config.concurrency = ("net",), ("0.1MP",), (1, 4)
        config.duration, config.warmup, config.server_warmup, config.out = 1.0, 1.0, 0.0, config.work / "smoke"
        config.batches = BatchRun(batches=(1, 4), precisions=("fp32", "bf16"), duration=0.5, warmup=0.2)
    command = "tvserve bench " + " ".join(sys.argv[2:])
    report = run(config)
    print(write(report, config.out, command.strip()))
    if args.smoke:
        from tvserve.tools.bench import check_smoke

        check_smoke(report)
        print("bench smoke: every system answered, no errors")


def batch_run(args):
    """The bench's batch rows (tvserve/tools/batches.py) as asked, by default on a GPU only; None: none."""
    from tvserve.tools.batches import GPU_BATCHES, BatchRun

    import torch

    wanted = args.batches or (",".join(map(str, GPU_BATCHES)) if torch.cuda.is_available() else "none")
    if wanted == "none":
        return None
    try:
        batches = tuple(int(size) for size in wanted.split(","))
    except ValueError:
        raise TvserveError(f"--batches takes comma-separated batch sizes (e.g. 1,8,32,64) or none; got {wanted!r}.") from None
    return BatchRun(batches=batches, precisions=tuple(args.precisions.split(",")), decodes=tuple(args.decodes.split(",")),
                    duration=args.duration, warmup=args.warmup)


def cmd_soak(args):
    from tvserve.tools.soak import soak

    api_keys = keys(args)
    report = soak(args.model, [path.read_bytes() for path in args.images], url=args.url,
                  management_url=args.management_url, token=api_keys.get("inference"),
                  management_token=api_keys.get("management"),
                  duration=args.duration, concurrency=args.concurrency, min_requests=args.min_requests)
    print(json.dumps(report, indent=2))
    mib = {pid: f"{rss / 2**20:.1f} MiB" for pid, rss in report["rss_end"].items()}
    growth = report["rss_growth"]
    print(f"{report['requests']} requests in {report['seconds']:.0f} s, {len(report['errors'])} errors, "
          f"p50 {report['p50_ms']:.1f} ms, p99 {report['p99_ms']:.1f} ms; worker RSS at the end {mib}, "
          f"growth {'n/a' if growth is None else f'{100 * growth:.1f}%'}")
    if report["errors"] or report["workers_replaced"] or growth is None or growth >= args.max_rss_growth:
        raise TvserveError(f"soak failed: {len(report['errors'])} errors, workers replaced "
                           f"{report['workers_replaced']}, RSS growth {growth}")


def cmd_train(args):
    from training.train import main

    main(args)


def cmd_prepare(args):
    from tvserve.archiving.defaults import prepare_default_archives

    prepare_default_archives(model_store=args.model_store, runs=args.runs)


def cmd_serve(args):
    from handlers.record import DECODE_ENV
    from tvserve.ops.server import Server

    args.workdir.mkdir(parents=True, exist_ok=True)
    config = args.config or (PRODUCTION_CONFIG if args.production else DEVELOPMENT_CONFIG)
    env = {**precision_env(args.precision), **({DECODE_ENV: args.decode} if args.decode else {})}  # the workers read them
    server = Server(model_store=args.model_store, config=config, workdir=args.workdir, models=args.models, env=env)
    models = server.expected_models()
    if not models:
        raise TvserveError(f"No archives in {server.model_store}. Run `tvserve prepare` or `tvserve archive ...`.")
    print(f"Starting TorchServe with {', '.join(models)} (logs: {server.log_dir}) ...", flush=True)
    print(f"Sized for {server.machine.describe()}:")
    for plan in server.plans:
        print(f"  {plan.line()}")
    server.start()
    probe = start_probe(server) if not args.detach else None
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl-C: drained, exit 0
    detached = False
    try:
        server.wait_ready(args.timeout)
        print(f"Ready: {', '.join(models)}")
        print(f"  inference:  {server.inference_url}/predictions/<model>")
        print(f"  management: {server.management_url}/models")
        if server.console_url:
            print(f"  console:    {server.console_url}  (open it in a browser)")
        print_try_line(server, models[0])
        if args.detach:
            detached = True
            print(f"Detached (pid {server.process.pid}); stop it with `tvserve stop --workdir {args.workdir}`.")
            return
        code = server.process.wait()
        raise TvserveError(f"TorchServe exited with code {code}.\n{server.console_tail()}")
    except KeyboardInterrupt:
        leave_pool(server, probe)
        print("\nStopping TorchServe: letting accepted requests finish ...", flush=True)
    finally:
        if not detached:
            server.stop()
        if probe is not None:
            probe.close()


def precision_env(precision: str) -> dict:
    """The workers' environment for `tvserve serve --precision P` ({} without it); refuses an
    unknown precision, or int8 (it needs an archive's exported file), before anything starts."""
    if not precision:
        return {}
    from handlers.precision import ENV, OVERRIDES, get_precision

    try:
        get_precision(precision, OVERRIDES)
    except ValueError as err:
        raise TvserveError(f"--precision {precision}: {err} (int8 is chosen when archiving: "
                           "`tvserve archive ... --precision int8`).") from None
    return {ENV: precision}


def start_probe(server):
    """The /ready, /live and /metrics endpoint (tvserve/ops/probe.py) where the configuration
    names an address for it; None where it does not."""
    from tvserve.ops.probe import PROBE_PROPERTY, Probe

    address = server.properties.get(PROBE_PROPERTY)
    if not address:
        return None
    try:
        probe = Probe(server, address).start()
    except OSError as err:
        server.stop()
        raise TvserveError(f"The probe cannot listen on {address} ({err}): free that port or set "
                           f"{PROBE_PROPERTY} (TVSERVE_PROBE_ADDRESS in the container) to another.") from None
    print(f"  probe:      {address}/ready, /live, /metrics", flush=True)
    return probe


def leave_pool(server, probe) -> None:
    """Before draining: /ready answers 503 for the configured seconds, so that load balancers and
    Kubernetes' endpoints stop sending requests while TorchServe still accepts them."""
    from tvserve.ops.probe import UNREADY_PROPERTY

    if probe is None:
        return
    probe.stopping()  # 503 from now on, through the drain
    seconds = float(server.properties.get(UNREADY_PROPERTY, 0))
    if seconds <= 0:
        return
    print(f"\nNot ready (503 on /ready) for {seconds:g} s so that balancers stop routing ...", flush=True)
    time.sleep(seconds)


def print_try_line(server, model: str) -> None:
    """How to send a first request. With tokens on, where the key is and how to read it: never the
    key itself (this goes to logs that operators ship elsewhere)."""
    local = server.inference_url.replace("0.0.0.0", "127.0.0.1")
    if not server.keys():
        print(f"  try: curl -T IMAGE {local}/predictions/{model}", flush=True)
        return
    key_file = server.workdir / client.KEY_FILE
    print(f"  token authorization is on: the API keys are in {key_file} (mode 0600)")
    for api, source in client.key_sources(server.workdir).items():
        print(f"  {api} key: {source}")
    print("  send the inference key:")
    print(f"  try: curl -H \"Authorization: Bearer $(python3 -c 'import json; "
          f"print(json.load(open(\"{key_file}\"))[\"inference\"][\"key\"])')\" -T IMAGE {local}/predictions/{model}",
          flush=True)


def cmd_export_kserve(args):
    from tvserve.ops.kserve import export_kserve

    written = export_kserve(args.model_store, args.dest, force=args.force)
    print(f"{len(written) - 1} archive(s) and {written[0]} written: copy {args.dest} to your storageUri "
          "(docs/deploying.md, Running on KServe)")


def cmd_stop(args):
    from tvserve.ops.server import stop_recorded

    if not stop_recorded(args.workdir):
        raise TvserveError(f"No running server recorded in {args.workdir / 'server.json'}.")
    print("stopped")


def keys(args) -> dict:
    """API keys of the server whose working directory is --workdir ({} with tokens off)."""
    return client.read_keys(args.workdir)


def cmd_predict(args):
    from tvserve.tools.draw import describe, draw

    token = keys(args).get("inference")
    options = {name: value for name, value in (("threshold", args.threshold), ("max_detections", args.max_detections))
               if value is not None}
    if args.pairs and len(args.images) % 2:
        raise TvserveError(f"--pairs takes the images two at a time (first and second frame); got {len(args.images)}.")
    requests_ = list(zip(args.images[::2], args.images[1::2])) if args.pairs else args.images
    for image in requests_:
        answer = client.predict(args.model, list(image) if args.pairs else image, url=args.url, topk=args.topk,
                                version=args.model_version, token=token, options=options, timeout=args.timeout)
        first = image[0] if args.pairs else image
        print(f"{' + '.join(map(str, image)) if args.pairs else image}:")
        print("\n".join(describe(answer)))
        if args.draw:
            out = args.draw / f"{Path(first).stem}.{args.model}.png"
            print(f"  drawn: {draw(first, answer, out)}")


def cmd_describe(args):
    from tvserve.archiving.mar import read_record

    target = Path(args.target)
    if target.suffix == ".mar" or target.exists():
        record = read_record(target)
        print(record.to_json())
        line = precision_line(record.backend)
        if line:  # the measured cost, readable, beside the JSON
            print(f"{target.name}: {line}", file=sys.stderr)
        return
    print(json.dumps(client.describe_model(args.target, management_url=args.management_url,
                                           token=keys(args).get("management")), indent=2))


def precision_line(backend) -> str:
    """"PRECISION: its measured effect against fp32", or None for fp32 (and records without a backend)."""
    from tvserve.archiving.calibration import counterpart_summary, effect_summary, summary

    if backend and backend.counterpart:
        return counterpart_summary(backend.counterpart)
    if backend and backend.quantization:
        return f"{backend.precision}: {summary(backend.quantization, backend.precision)}"
    if backend and backend.effect:
        return f"{backend.precision}: {effect_summary(backend.effect)}"
    return None


def shared_flags() -> tuple:
    """Parent parsers for the flags several commands share, each declared once."""
    server_files = argparse.ArgumentParser(add_help=False)
    server_files.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                              help=f"the server's working directory: logs, state, API keys (default {DEFAULT_WORKDIR})")
    inference_api = argparse.ArgumentParser(add_help=False)
    inference_api.add_argument("--url", default=client.DEFAULT_URL, help="the inference API")
    management_api = argparse.ArgumentParser(add_help=False)
    management_api.add_argument("--management-url", default=client.DEFAULT_MANAGEMENT_URL, help="the management API")
    model_store = argparse.ArgumentParser(add_help=False)
    model_store.add_argument("--model-store", type=Path, default=DEFAULT_MODEL_STORE,
                             help="the folder of .mar archives (default: model_store/ in the current folder)")
    return server_files, inference_api, management_api, model_store


def get_parser(with_training: bool = True):
    """The CLI's parser; `train`'s flags (which import torch) only `with_training`."""
    parser = argparse.ArgumentParser(
        prog="tvserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    server_files, inference_api, management_api, model_store = shared_flags()

    if with_training:
        from training.train import get_args_parser
    train = commands.add_parser("train", parents=[get_args_parser(add_help=False)] if with_training else [],
                                help="train one of the book's CNNs (same flags as python -m training.train)")
    train.set_defaults(func=cmd_train)

    archive = commands.add_parser("archive", help="build a .mar archive")
    kinds = archive.add_subparsers(dest="kind", required=True)
    torchvision_ = kinds.add_parser("torchvision", help="a torchvision model of any task (`tvserve zoo` lists them)")
    torchvision_.add_argument("model", help="e.g. resnet18, fasterrcnn_resnet50_fpn, deeplabv3_resnet50")
    weights = torchvision_.add_mutually_exclusive_group()
    weights.add_argument("--weights", default="DEFAULT", help="weights enum: DEFAULT, IMAGENET1K_V1, COCO_V1, ...")
    weights.add_argument("--random-init", action="store_true", help="random weights: for tests only")
    torchvision_.add_argument("--weights-file", type=Path, help="a state_dict file for those weights")
    add_archive_options(torchvision_)
    torchvision_.set_defaults(func=cmd_archive_torchvision)
    checkpoint = kinds.add_parser("checkpoint", help="a checkpoint written by training/")
    checkpoint.add_argument("checkpoint", type=Path)
    add_archive_options(checkpoint)
    checkpoint.set_defaults(func=cmd_archive_checkpoint)

    custom = kinds.add_parser("custom", help="any nn.Module classifier from a Python file")
    custom.add_argument("--model-file", type=Path, required=True, help="Python file defining the module")
    custom.add_argument("--class", dest="class_name", required=True, help="the nn.Module class in it")
    custom.add_argument("--init-args", help='constructor keyword arguments as JSON, e.g. \'{"width": 8}\'')
    custom.add_argument("--weights", type=Path, required=True, help="its state_dict file")
    custom.add_argument("--labels", type=Path, required=True, help="text file, one label per line")
    custom.add_argument("--resize", type=int, required=True, help="shorter side after resize")
    custom.add_argument("--crop", type=int, required=True, help="center crop size")
    custom.add_argument("--interpolation", default="bilinear", choices=["bilinear", "bicubic", "nearest"])
    custom.add_argument("--mean", required=True, help="R,G,B, e.g. 0.5,0.5,0.5")
    custom.add_argument("--std", required=True, help="R,G,B")
    add_archive_options(custom)
    custom.set_defaults(func=cmd_archive_custom)

    zoo = commands.add_parser("zoo", help="list torchvision's pretrained models and weights, by task")
    zoo.add_argument("--json", action="store_true")
    zoo.set_defaults(func=cmd_zoo)

    register = commands.add_parser("register", parents=[management_api, server_files], help="load an archive of the model store into a running server")
    register.add_argument("archive", help="file name in the server's model store, e.g. digits_net-2.0.mar")
    register.add_argument("--workers", type=int, default=1)
    register.set_defaults(func=cmd_register)

    set_default = commands.add_parser("set-default", parents=[management_api, server_files], help="make a served version the default")
    set_default.add_argument("model")
    set_default.add_argument("model_version")
    set_default.set_defaults(func=cmd_set_default)

    evaluate = commands.add_parser("evaluate", help="accuracy and confusion matrix of a checkpoint, "
                                   "in-process and (with --url) through a running server")
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("--dataset", help="default: the checkpoint's own, with its validation split")
    evaluate.add_argument("--data-dir", type=Path)
    evaluate.add_argument("--url", help="inference URL of a server serving the checkpoint")
    evaluate.add_argument("--model", help="the served model's name (with --url)")
    evaluate.add_argument("--inverted", action="store_true",
                          help="score the validation images with their polarity inverted (dark digits on white)")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)

    soak = commands.add_parser("soak", parents=[inference_api, management_api, server_files], help="steady load for a set time; reports errors and worker RSS")
    soak.add_argument("model")
    soak.add_argument("images", nargs="+", type=Path)
    soak.add_argument("--duration", type=float, default=600, help="s (default 10 minutes)")
    soak.add_argument("--concurrency", type=int, default=4)
    soak.add_argument("--min-requests", type=int, default=0,
                      help="go on past --duration until this many requests were answered (at most 10x --duration)")
    soak.add_argument("--max-rss-growth", type=float, default=0.10, help="fail above this fraction")
    soak.set_defaults(func=cmd_soak)

    bench = commands.add_parser("bench", help="in-process vs tvserve vs stock TorchServe, side by side (needs wrk)")
    bench.add_argument("--models", default="resnet18,net", help="comma-separated: resnet18 (or another torchvision "
                       "model), net (the book's Net on digits)")
    bench.add_argument("--images", default="0.1MP,0.5MP,12MP", help="comma-separated JPEG sizes")
    bench.add_argument("--concurrency", default="1,4,16", help="comma-separated connection counts")
    bench.add_argument("--duration", type=float, default=8, help="s measured per point")
    bench.add_argument("--warmup", type=float, default=2, help="s of load before each point")
    bench.add_argument("--server-warmup", type=float, default=30, help="s of load on each fresh server before its "
                       "first point, at the highest concurrency (the Java frontend's JIT compiles meanwhile)")
    bench.add_argument("--out", type=Path, default=Path("benchmarks"), help="where latest.md and latest.json go")
    bench.add_argument("--work", type=Path, default=Path(".tvserve/bench"), help="archives, images, server logs")
    bench.add_argument("--no-http", action="store_true", help="in-process rows only (no Java or wrk here)")
    bench.add_argument("--systems", default="tvserve,serial,draft,int8,stock", help="comma-separated: tvserve (fp32, "
                       "always) and serial (the worker without its pipeline: batches of 1, no prepare pool), draft "
                       "(--jpeg-draft), tensor (--gpu-decode), int8 (--precision int8), stock (TorchServe's own handler), "
                       "litserve (LitServe 0.2.19, 1-2 workers, batch 1 and 4; needs `pip install -e '.[peers]'`)")
    bench.add_argument("--calibration", type=Path, help="int8 calibration images for the torchvision model (default: "
                       "crops of the benchmark photos, timing only)")
    bench.add_argument("--batches", help="in-process rows by batch size, handler pipeline against forward only, e.g. "
                       "1,8,32,64 (default: those on a GPU, none on a CPU; `none` skips them)")
    bench.add_argument("--precisions", default="fp32,tf32,bf16,fp16", help="the batch rows' precisions (TVSERVE_PRECISION)")
    bench.add_argument("--decodes", default="pil,tensor", help="the batch rows' decode paths (TVSERVE_DECODE)")
    bench.add_argument("--smoke", action="store_true", help="a seconds-long run of the book's Net that checks the harness")
    bench.set_defaults(func=cmd_bench)

    prepare = commands.add_parser("prepare", parents=[model_store], help="build the default archives that are missing")
    prepare.add_argument("--runs", type=Path, default=Path("runs"))
    prepare.set_defaults(func=cmd_prepare)

    serve = commands.add_parser("serve", parents=[model_store, server_files], help="run TorchServe until Ctrl-C, once every model is READY")
    serve.add_argument("--config", type=Path, help=f"default: {DEVELOPMENT_CONFIG}, or {PRODUCTION_CONFIG}")
    serve.add_argument("--production", action="store_true",
                       help="token auth, management on loopback, no registration API (the container's)")
    serve.add_argument("--models", default="all", help="all, or NAME.mar[,NAME.mar...]")
    serve.add_argument("--timeout", type=float, help="s to wait for READY (default: archives' startupTimeout)")
    serve.add_argument("--detach", action="store_true", help="return once ready, leaving the server running")
    serve.add_argument("--precision", help="run every model in fp32, tf32, bf16 or fp16 instead of its archive's "
                       "precision (sets TVSERVE_PRECISION for the workers; docs/precision.md)")
    serve.add_argument("--decode", choices=["pil", "tensor"], help="override every archive's recorded decoding "
                       "(as TVSERVE_DECODE does): pil (exact) or tensor (--gpu-decode's; lossy)")
    serve.set_defaults(func=cmd_serve)

    export = commands.add_parser("export", help="write a model store in another serving system's layout")
    targets = export.add_subparsers(dest="target", required=True)
    kserve = targets.add_parser("kserve", parents=[model_store], help="KServe's TorchServe runtime: "
                                "DEST/config/config.properties and DEST/model-store/*.mar")
    kserve.add_argument("dest", type=Path)
    kserve.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    kserve.set_defaults(func=cmd_export_kserve)

    health = commands.add_parser("health", parents=[server_files], help="exit 0 only when every model's workers are READY")
    health.set_defaults(func=cmd_health)

    stop = commands.add_parser("stop", parents=[server_files], help="stop a server started with --detach")
    stop.set_defaults(func=cmd_stop)

    predict = commands.add_parser("predict", parents=[inference_api, server_files],
                                  help="the answers for image files, clips (video models) or pairs (optical flow)")
    predict.add_argument("model")
    predict.add_argument("images", nargs="+", type=Path, help="image files, or clips (MP4, WebM, GIF) for video models")
    predict.add_argument("--pairs", action="store_true",
                         help="optical flow: the images two at a time, each pair's first and second frame")
    predict.add_argument("--topk", type=int, help="classification: how many labels")
    predict.add_argument("--threshold", type=float, help="detection: the least score answered (default 0.5)")
    predict.add_argument("--max-detections", type=int, help="detection: at most this many (default 100)")
    predict.add_argument("--draw", type=Path, metavar="FOLDER",
                         help="write each image with its boxes, masks or keypoints drawn into FOLDER "
                              "(a clip: frames with its labels; a pair: its first image beside the flow's colours)")
    predict.add_argument("--model-version")
    predict.add_argument("--timeout", type=float, default=60,
                         help="seconds to wait for the server's answer to each image (default 60)")
    predict.set_defaults(func=cmd_predict)

    describe = commands.add_parser("describe", parents=[management_api, server_files], help="metadata of a .mar file or of a served model")
    describe.add_argument("target", help="path to a .mar, or a served model's name")
    describe.set_defaults(func=cmd_describe)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = get_parser(with_training="train" in argv or not argv or "-h" in argv or "--help" in argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not args.verbose:
        logging.getLogger("urllib3").setLevel(logging.ERROR)  # tvserve.ops.client logs each retry with its reason
    try:
        args.func(args)
    except (TvserveError, TrainingError) as err:  # mistakes the user can fix: one line
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
