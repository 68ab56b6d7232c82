"""Whether ``retmask generate`` would start, resume or refuse an output location, decided without writing.

The output section of ``retmask plan`` (``pipeline.plan``). A local path's writability is read from the
permissions of it or its nearest existing parent; an object store is not probed for writing (generate
proves it at start by writing the manifest). The resume decision reuses ``pipeline.shards``'s own refusal
checks (same run, writer lease) on the manifest, against the run config generate would record
(``pipeline.run_config``). Identity parts that cannot be computed here (the weights' hash from a directory
holding only config.json, the chat template without a tokenizer) are taken as equal and named as not
compared.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from retrieval_heads.errors import RetmaskError, redact


def check_output(report, config, hf_config, masks: dict | None, tokenizer, hub_record: dict | None) -> None:
    """Add the output location's section to ``report`` (a ``PlanReport``): new, resumes, or refused and why."""
    import pyarrow.fs as pafs

    from pipeline import shards

    s, out = "output location", redact(config.out)
    local = "://" not in str(config.out)
    try:
        fs, root = shards.output_fs(config.out)
    except RetmaskError as err:
        if local:
            report.problem(s, str(err))
        else:  # this machine may simply not reach the store the cluster writes to
            report.add(s, f"not checked from here: {err}")
        return
    if local:
        writable = _local_writable(report, s, Path(root))
        if not writable:
            return
    else:
        report.add(s, f"{out}: object store; writing not probed "
                      "(generate proves it at start by writing the manifest)")
    try:
        manifest = shards.load_manifest(fs, root)
        if manifest is None:
            leftovers = {i.base_name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))}
            data = fs.get_file_info(pafs.FileSelector(f"{root}/{shards.DATA}", allow_not_found=True))
            leftovers = (leftovers - {shards.DATA}) | {i.base_name for i in data if i.type == pafs.FileType.File}
            if any(not n.startswith(".tmp-") for n in leftovers):
                report.problem(s, f"refused: {out} already holds files but no {shards.MANIFEST}; use an empty or "
                                  "new output directory")
            else:
                report.add(s, "new: generate will start this run there")
                report.values["output"] = "new"
            return
    except (OSError, RetmaskError) as err:
        if local:
            report.problem(s, f"cannot read {out} ({' '.join(str(err).split())})")
        else:
            report.add(s, f"resume: not checked (cannot read {out} from here: {' '.join(str(err).split())[:200]})")
        return
    _resume(report, s, out, config, manifest, hf_config, masks, tokenizer, hub_record)


def _local_writable(report, s: str, root: Path) -> bool:
    """Writable judged from permissions alone: the directory, or the nearest existing parent to be made in."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        report.problem(s, f"not writable: {probe} is a file, so {root} cannot be made; pick a directory path")
        return False
    if not os.access(probe, os.W_OK | os.X_OK):
        report.problem(s, f"not writable: no write permission on {probe}; pick a writable location")
        return False
    report.add(s, f"{root}: writable ({'exists' if probe == root else f'will be made in {probe}'})")
    return True


def _resume(report, s, out, config, manifest, hf_config, masks, tokenizer, hub_record) -> None:
    from pipeline import shards
    from pipeline.run_config import model_record, run_config

    try:
        shards.check_manifest(manifest, f"{out}/{shards.MANIFEST}")
    except RetmaskError as err:
        report.problem(s, f"refused: {err}")
        return
    committed = sum(e["rows"] for e in manifest["shards"])
    if masks is None:
        report.add(s, f"holds {committed:,} committed prompts; resume not checked "
                      "(the masks are unknown: see above)")
        return
    record = hub_record or model_record(config)[1]
    skipped = []
    old = manifest["run_config"]
    if not (hub_record or _has_weights(record["path"])):
        # a config.json-only directory: no weights to hash, so the recorded hash stands in (absent stays absent)
        record = {k: v for k, v in record.items() if k != "hash"}
        if isinstance(old.get("model"), dict) and "hash" in old["model"]:
            record["hash"] = old["model"]["hash"]
        skipped.append("model.hash (no weights here)")
    new = shards.normalized_config(run_config(config, record, masks, hf_config,
                                        tokenizer or SimpleNamespace(chat_template=None)))
    if tokenizer is None:
        new["chat_template"] = old.get("chat_template")
        skipped.append("chat_template (no tokenizer here)")
    try:
        shards.check_same_run(out, manifest, new, list(config.variants))
        shards.check_lease(out, manifest.get("writer"))
    except RetmaskError as err:
        report.problem(s, f"refused: {err}")
        return
    report.values["output"] = f"resumes {committed}"
    report.add(s, f"resumes {committed:,} committed prompts ({len(manifest['shards'])} shards; the manifest's count, "
                  "every shard is verified when generate resumes)")
    if skipped:
        report.add(s, f"not compared: {', '.join(skipped)}")


def _has_weights(path: str) -> bool:
    from pipeline.provenance import weight_files

    return bool(weight_files(path))
