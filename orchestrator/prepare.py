"""`python -m orchestrator.prepare SOURCE DEST [options]`: a data set prepared once for training at any scale.

SOURCE is the raw data as downloaded (a local directory, or an s3:// prefix): Fashion-MNIST IDX files, the
official downsampled-ImageNet npz batches, or a folder tree of photos (ImageNet, AFHQ); the kind is
detected, `--kind` forces it (orchestrator/raw_data.py). DEST is a local directory or an s3:// prefix; it
receives fixed-size uint8 shards, their checksums and a manifest (format: tarflow/prepared.py), which
`data=imagenet64_prepared` (and the other *_prepared presets) train from, every node fetching them once
(orchestrator/datacache.py).

    python -m orchestrator.prepare /data/imagenet64 s3://bucket/prepared/imagenet64 --fid-stats \
        --endpoint-url http://minio:9000 --address auto --inception-weights s3://bucket/weights/pt_inception.pth

- The work is spread over every CPU of a Ray cluster (`--address`, else RAY_ADDRESS, else a local
  instance) with Ray Data: one task per shard decodes its inputs and writes the shard and its sidecar (sizes,
  sha256) straight to DEST. The nodes must reach SOURCE and DEST: an s3:// URI, or a path mounted on every
  node; their own AWS credential chain is used.
- Resumable: the plan is deterministic (sorted files, fixed shard size), a shard counts as done when its
  sidecar matches the plan and its files have the recorded sizes, so a rerun writes only what is missing.
  The manifest is written last; a DEST that has one is checked (sizes; `--verify`: sha256 too) and left
  alone ("already prepared"). Asking for other settings into a prepared DEST is refused.
- Bad sources: one error naming the file. In a folder tree, photos that cannot be decoded are skipped,
  named in the manifest and counted (see orchestrator/raw_data.py); files that are not photos by their
  extension are ignored, as the direct loader ignores them.
- `--fid-stats`: the FID reference statistics of the train split with flips (the paper's protocol, as
  orchestrator.evaluation computes them: TF-FID Inception pool3 features of every image and its mirror),
  computed by Ray tasks over the shards (on GPUs when the cluster has them) into DEST/fid_stats.npz and
  recorded in the manifest; `tarflow.fid.prepared_fid_statistics(local_root)` reads them back.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import posixpath
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.fs as pafs

from tarflow.model import ConfigError
from tarflow.prepared import (
    FID_STATS_FILE,
    MANIFEST,
    VERSION,
    encode_shard,
    file_record,
    make_manifest,
    parse_manifest,
    sha256_file,
    shard_files,
)

from .errors import ExperimentError, cli_entry
from .raw_data import KINDS, SourcePlan, SourceTree, detect_kind, plan_source, read_shard
from .storage import RunStorage


@dataclass
class PrepareReport:
    dest: str
    manifest: dict
    shards: int                 # in the plan
    written: int                # made by this call (the rest were already in DEST)
    already_prepared: bool      # DEST had a manifest: nothing was made (FID statistics excepted)
    fid_stats_written: bool


def prepare(source: str, dest: str, *, kind: str | None = None, image_size: int | None = None,
            fit: str | None = None, channels: int | None = None, limit: int | None = None,
            shard_size: int | None = None, endpoint_url: str | None = None, address: str | None = None,
            num_cpus: int | None = None, fid_stats: bool = False, inception_weights: str | None = None,
            verify: bool = False, log=print) -> PrepareReport:
    """Prepare SOURCE into DEST (see the module docstring). Uses the running Ray instance if there is one."""
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    if kind is not None and kind not in KINDS:
        raise ExperimentError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    out = RunStorage(dest, endpoint_url)
    out.check()
    tree = SourceTree(source, endpoint_url)
    asked = {"kind": kind, "image_size": image_size, "fit": fit, "channels": channels, "shard_size": shard_size}

    existing = _dest_manifest(out, log)
    if existing is not None:
        _same_request(existing, out, tree.uri, asked, limit)
        _check_dest_files(out, existing, verify)
        return _add_fid_statistics(out, existing, fid_stats, inception_weights, address, num_cpus, log)

    files = tree.list_files()
    kind = kind or detect_kind(files, tree.uri)
    plan = plan_source(tree, files, kind, image_size, fit, channels, limit, shard_size)
    settings = {"kind": plan.kind, "image_size": plan.image_size, "fit": plan.fit, "channels": plan.channels,
                "limit": limit, "shard_size": shard_size, "native": plan.native}
    job = {"source": [tree.uri, endpoint_url], "dest": [out.uri, endpoint_url],
           "plan": {k: v for k, v in asdict(plan).items() if k not in ("shards", "classes", "ignored")}}
    for shard in plan.shards:
        shard["plan"] = _shard_hash(job, shard)
    done = _finished_shards(out, plan.shards)
    todo = [s for s in plan.shards if (s["split"], s["index"]) not in done]
    log(f"{tree.uri} ({plan.kind}) -> {out.describe()}: {len(plan.shards)} shards of {plan.channels}×"
        f"{plan.image_size}×{plan.image_size}; {len(done)} already there, {len(todo)} to make")
    with _ray(address, num_cpus):
        _make_shards(job, todo, done, log)
        sidecars = [done[(s["split"], s["index"])] for s in plan.shards]
        record = stats_file = None
        if fid_stats:
            record, stats_file = _fid_statistics(out, sidecars, inception_weights, log)
    manifest = _manifest_of(plan, sidecars, tree.uri, settings, record, stats_file)
    _write_manifest(out, manifest)
    skipped = {name: s["skipped_count"] for name, s in manifest["splits"].items() if s["skipped_count"]}
    log(f"{out.describe()}: prepared ({_counts(manifest)})"
        + (f"; skipped undecodable photos {skipped}, named in {MANIFEST}" if skipped else ""))
    return PrepareReport(out.uri, manifest, len(plan.shards), len(todo), False, bool(record))


def _add_fid_statistics(out: RunStorage, existing: dict, fid_stats: bool, inception_weights: str | None,
                        address: str | None, num_cpus: int | None, log) -> PrepareReport:
    """A prepared DEST is left as it is, but for the FID statistics when they are asked for and missing."""
    if not fid_stats or existing.get("fid_stats"):
        log(f"{out.describe()}: already prepared ({_counts(existing)}); left as it is")
        return PrepareReport(out.uri, existing, _num_shards(existing), 0, True, False)
    sidecars = [{"split": name, "index": i, **shard} for name, split in existing["splits"].items()
                for i, shard in enumerate(split["shards"])]
    with _ray(address, num_cpus):
        record, stats_file = _fid_statistics(out, sidecars, inception_weights, log)
    manifest = {**existing, "files": {**existing["files"], FID_STATS_FILE: stats_file}, "fid_stats": record}
    _write_manifest(out, manifest)
    return PrepareReport(out.uri, manifest, _num_shards(existing), 0, True, True)


def _make_shards(job: dict, todo: list[dict], done: dict, log) -> None:
    """One Ray Data task per missing shard; their sidecars into `done`. The first error names its file."""
    if not todo:
        return
    t0 = time.perf_counter()
    errors = []
    for row in _run_tasks(_shard_task, [json.dumps({"job": job, "shard": s}) for s in todo]):
        result = json.loads(row["result"])
        if "error" in result:
            errors.append(result["error"])
        else:
            done[(result["split"], result["index"])] = result
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ExperimentError(f"{errors[0]}{more}")
    log(f"made {len(todo)} shards ({sum(s['count'] for s in todo)} images) in {time.perf_counter() - t0:.1f} s")


def _manifest_of(plan: SourcePlan, sidecars: list[dict], source_uri: str, settings: dict, record, stats_file) -> dict:
    splits = {}
    for sc in sidecars:
        split = splits.setdefault(sc["split"], {"shards": [], "skipped": [],
                                                "ignored": plan.ignored.get(sc["split"], 0)})
        split["shards"].append({"images": sc["images"], "labels": sc["labels"], "count": sc["count"]})
        split["skipped"] += sc["skipped"]
    data_files = {rel: rec for sc in sidecars for rel, rec in sc["files"].items()}
    if stats_file:
        data_files[FID_STATS_FILE] = stats_file
    return make_manifest(image_shape=[plan.channels, plan.image_size, plan.image_size], classes=plan.classes,
                         splits=splits, files=data_files, source={"uri": source_uri, "kind": plan.kind},
                         settings=settings, transform=plan.transform(), fid_stats=record)


# ---------------------------------------------------------------------------------------------
# DEST: what is there already


def _dest_manifest(out: RunStorage, log) -> dict | None:
    data = out.read_bytes(MANIFEST)
    if data is None:
        return None
    try:
        return parse_manifest(data, out.describe())
    except ConfigError as e:
        log(f"{e}; preparing again (finished shards are kept)")
        return None


def _same_request(manifest: dict, out: RunStorage, source_uri: str, asked: dict, limit: int | None) -> None:
    have = manifest["settings"]
    differ = [f"{k}: asked {v}, prepared {have.get(k)}" for k, v in asked.items() if v is not None and v != have.get(k)]
    if limit != have.get("limit"):
        differ.append(f"limit: asked {limit}, prepared {have.get('limit')}")
    if source_uri != manifest["source"]["uri"]:
        differ.append(f"source: asked {source_uri}, prepared from {manifest['source']['uri']}")
    if differ:
        raise ExperimentError(f"{out.describe()} already holds prepared data made with other settings "
                              f"({'; '.join(differ)}); prepare into another DEST, or delete it first")


def _check_dest_files(out: RunStorage, manifest: dict, checksums: bool) -> None:
    fs, root = out.filesystem_and_root()
    sizes = _listing(fs, root, {posixpath.dirname(rel) for rel in manifest["files"]})
    bad = [rel for rel, rec in manifest["files"].items() if sizes.get(rel) != rec["bytes"]]
    if checksums and not bad:
        def digest(rel: str) -> str:
            if not out.is_s3:
                return sha256_file(posixpath.join(root, rel))
            h = hashlib.sha256()
            with fs.open_input_stream(posixpath.join(root, rel)) as f:
                while block := f.read(1 << 22):
                    h.update(block)
            return h.hexdigest()

        with ThreadPoolExecutor(8) as pool:
            sums = dict(zip(manifest["files"], pool.map(digest, manifest["files"])))
        bad = [rel for rel, rec in manifest["files"].items() if sums[rel] != rec["sha256"]]
    if bad:
        raise ExperimentError(f"{out.describe()} has a manifest but {len(bad)} of its files are missing or differ "
                              f"from it ({', '.join(bad[:3])}); delete {MANIFEST} there and rerun this command: "
                              f"it remakes the shards that do not match")


def _listing(fs: pafs.FileSystem, root: str, folders) -> dict[str, int]:
    """{path relative to root: size} of the files directly in the given folders."""
    sizes = {}
    for folder in folders:
        sel = pafs.FileSelector(posixpath.join(root, folder) if folder else root, allow_not_found=True)
        for info in fs.get_file_info(sel):
            if info.type == pafs.FileType.File:
                sizes[posixpath.join(folder, posixpath.basename(info.path))] = info.size
    return sizes


def _shard_hash(job: dict, shard: dict) -> str:
    """What makes a shard's content: the format, source, conversion and the shard's inputs."""
    key = [VERSION, job["source"][0], job["plan"], shard["split"], shard["index"], shard["inputs"]]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _finished_shards(out: RunStorage, shards: list[dict]) -> dict[tuple, dict]:
    """The planned shards DEST already holds: sidecar of the same plan, files of the recorded sizes."""
    fs, root = out.filesystem_and_root()
    sizes = _listing(fs, root, {s["split"] for s in shards})
    candidates = [s for s in shards if shard_files(s["split"], s["index"])["sidecar"] in sizes]

    def sidecar(shard):
        data = out.read_bytes(shard_files(shard["split"], shard["index"])["sidecar"])
        try:
            return json.loads(data) if data else None
        except json.JSONDecodeError:
            return None

    with ThreadPoolExecutor(16) as pool:
        found = list(pool.map(sidecar, candidates))
    done = {}
    for shard, sc in zip(candidates, found):
        if sc and sc.get("plan") == shard["plan"] and all(sizes.get(rel) == rec["bytes"]
                                                          for rel, rec in sc["files"].items()):
            done[(shard["split"], shard["index"])] = sc
    return done


def _write_manifest(out: RunStorage, manifest: dict) -> None:
    out.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())


def _counts(manifest: dict) -> str:
    return ", ".join(f"{s['count']} {name}" for name, s in manifest["splits"].items()) + \
        f" images of {'×'.join(map(str, manifest['image_shape']))}"


def _num_shards(manifest: dict) -> int:
    return sum(len(s["shards"]) for s in manifest["splits"].values())


# ---------------------------------------------------------------------------------------------
# Tasks (run on the cluster's workers)


def make_shard(job: dict, shard: dict) -> dict:
    """Read, convert and write one shard to DEST; returns its sidecar (also written, after the data)."""
    tree, out = SourceTree(*job["source"]), RunStorage(*job["dest"])
    plan = SourcePlan(**job["plan"], classes=[])
    images, labels, skipped = read_shard(tree, plan, shard)
    names = shard_files(shard["split"], shard["index"])
    data = dict(zip(("images", "labels"), encode_shard(images, labels)))
    for key, blob in data.items():
        out.write_bytes(names[key], blob)
    sidecar = {"plan": shard["plan"], "split": shard["split"], "index": shard["index"], "count": len(labels),
               "images": names["images"], "labels": names["labels"],
               "files": {names[k]: file_record(blob) for k, blob in data.items()}, "skipped": skipped}
    out.write_bytes(names["sidecar"], json.dumps(sidecar).encode())
    return sidecar


def _shard_task(row: dict) -> dict:
    task = json.loads(row["task"])
    try:
        result = make_shard(task["job"], task["shard"])
    except ConfigError as e:  # a bad source file: one clear message for the driver, not a task traceback
        result = {"error": str(e)}
    except FileNotFoundError as e:
        result = {"error": f"on Ray node {socket.gethostname()}: {e}; every node must reach SOURCE and DEST (an "
                           f"s3:// URI, or a path mounted at the same place on every node)"}
    return {"result": json.dumps(result)}


def _fid_task(row: dict) -> dict:
    """Sums of Inception features (and of their outer products) of one shard's images and their mirrors."""
    import torch

    from tarflow.fid import FEATURE_DIM, InceptionFeatures

    from .evaluation import inception_weights_file

    task = json.loads(row["task"])
    out = RunStorage(*task["dest"])
    images = np.load(io.BytesIO(out.read_bytes(task["images"])), allow_pickle=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extractor = InceptionFeatures(inception_weights_file(task["weights"], out), device=device)
    s1 = torch.zeros(FEATURE_DIM, dtype=torch.float64, device=device)
    s2 = torch.zeros(FEATURE_DIM, FEATURE_DIM, dtype=torch.float64, device=device)
    batch = 250 if device.type == "cuda" else 50
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch])
        for view in (x, x.flip(-1)):  # uint8 goes to Inception exactly as the dataset's x in [-1, 1] would
            f = extractor(view).to(device, torch.float64)
            s1 += f.sum(0)
            s2 += f.T @ f
    return {"s1": s1.cpu().numpy(), "s2": s2.cpu().numpy(), "n": 2 * len(images)}


def _fid_statistics(out: RunStorage, sidecars: list[dict], weights: str | None, log) -> tuple[dict, dict]:
    """FID reference statistics of the train shards in DEST, written to DEST/fid_stats.npz:
    (the manifest's fid_stats record, the file's record)."""
    import ray

    from tarflow.fid import EXTRACTOR, FEATURE, FID_PROTOCOL, FIDStatistics

    from .evaluation import check_inception_weights

    check_inception_weights(weights, None, require_file=True)  # a local file: here, before any task
    train = [sc for sc in sidecars if sc["split"] == "train" and sc["count"]]
    t0 = time.perf_counter()
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    payloads = [json.dumps({"dest": [out.uri, out.endpoint_url], "images": sc["images"], "weights": weights})
                for sc in train]
    s1 = s2 = None
    n = 0
    for row in _run_tasks(_fid_task, payloads, num_gpus=gpus):
        s1 = row["s1"] if s1 is None else s1 + row["s1"]
        s2 = row["s2"] if s2 is None else s2 + row["s2"]
        n += int(row["n"])
    mu = s1 / n
    stats = FIDStatistics(mu, (s2 - n * np.outer(mu, mu)) / (n - 1), n)  # = evaluation.FeatureMoments
    buf = io.BytesIO()
    stats.save(buf)
    out.write_bytes(FID_STATS_FILE, buf.getvalue())
    images = sum(sc["count"] for sc in train)
    log(f"FID reference statistics of {images} train images with flips ({n} Inception features"
        f"{', on GPUs' if gpus else ''}) in {time.perf_counter() - t0:.1f} s -> {FID_STATS_FILE}")
    record = {"file": FID_STATS_FILE, "images": images, "features": n, "flips": True, "split": "train",
              "protocol": FID_PROTOCOL, "extractor": f"{EXTRACTOR}:{FEATURE}", "inception_weights": weights}
    return record, file_record(buf.getvalue())


# ---------------------------------------------------------------------------------------------
# Ray


@contextlib.contextmanager
def _ray(address: str | None, num_cpus: int | None):
    """The running Ray instance, or one joined/started for this call (and shut down after it)."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs = {"num_cpus": num_cpus, "include_dashboard": False} if address == "local" else {}
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as e:
        raise ExperimentError(f"cannot reach the Ray cluster at {address}: {e}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _run_tasks(fn, payloads: list[str], num_gpus: int = 0):
    """fn over the payloads with Ray Data, one task per payload (one shard), rows streamed back as they finish."""
    import ray.data

    ds = ray.data.from_items([{"task": p} for p in payloads], override_num_blocks=len(payloads))
    return ds.map(fn, num_cpus=1, num_gpus=num_gpus or None).iter_rows()


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m orchestrator.prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="the raw data as downloaded: a local directory or s3://bucket/prefix")
    p.add_argument("dest", help="where the prepared data goes: a local directory or s3://bucket/prefix")
    p.add_argument("--kind", choices=KINDS, help="what SOURCE holds (default: detected)")
    p.add_argument("--image-size", type=int, help="output side S (default: native; required for photos)")
    p.add_argument("--fit", choices=("pad", "resize"), help="to reach S: pad (grow only) or resize + centre crop "
                                                            "(default: pad; photos are always resized)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="1 (gray) or 3 (RGB); default: native")
    p.add_argument("--limit", type=int, help="only the first N images of each split (smoke tests)")
    p.add_argument("--shard-size", type=int, help="images per shard (default: 64 MiB of pixels)")
    p.add_argument("--endpoint-url", help="S3 endpoint for SOURCE and DEST (default: $AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--address", help="Ray cluster to spread the work over (default: $RAY_ADDRESS, else a local "
                                     "instance)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--fid-stats", action=argparse.BooleanOptionalAction, default=False,
                   help="also compute the FID reference statistics of the train split (with flips)")
    p.add_argument("--inception-weights", help="as eval.fid.inception_weights: a path on every node, s3://..., "
                                               "or fid-helper (default: torch-fidelity's download)")
    p.add_argument("--verify", action="store_true", help="on a prepared DEST, also check every file's sha256")
    args = p.parse_args(argv)
    for key in ("image_size", "limit", "shard_size", "num_cpus"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be a positive integer")
    return args


@cli_entry
def main(argv=None) -> int:
    a = parse_args(argv)
    prepare(a.source, a.dest, kind=a.kind, image_size=a.image_size, fit=a.fit, channels=a.channels, limit=a.limit,
            shard_size=a.shard_size, endpoint_url=a.endpoint_url, address=a.address, num_cpus=a.num_cpus,
            fid_stats=a.fid_stats, inception_weights=a.inception_weights, verify=a.verify)
    return 0


if __name__ == "__main__":
    sys.exit(main())
