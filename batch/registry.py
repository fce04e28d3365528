"""The model registry from the shell: ``python -m batch.registry ls|current|history|promote|rollback``.

    python -m batch.registry ls                      # versions, newest last; * marks CURRENT
    python -m batch.registry promote 20261129T101500Z
    python -m batch.registry rollback                # CURRENT back to where it was before its last move
    python -m batch.registry prune --keep 30         # delete older bundles (CURRENT and its rollbacks stay)

Bucket and model name come from CLICKSTREAM_BUCKET / CLICKSTREAM_MODEL_NAME (or --bucket / --name).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import click
import numpy as np

from batch.train_config import TrainSettings
from common import aws, logs, registry
from common.cli import CLI_CONTEXT, AwsGroup, ConfigFailed
from common.config import ConfigError, load
from common.features import FEATURE_VERSION
from common.onnx_runtime import onnxruntime


@dataclass(frozen=True)
class RegistrySettings(TrainSettings):
    """The trainer's settings (same keys, same [train] section) without its range checks: a rollback
    during an incident must not fail on an unrelated training knob such as eval_fraction."""

    def validate(self) -> None:
        pass


def _context(bucket: str | None, name: str | None):
    try:
        settings = load(RegistrySettings, section="train", bucket=bucket, model_name=name)
    except ConfigError as exc:
        raise ConfigFailed(exc) from None
    return aws.client("s3", settings.region), settings.bucket, settings.model_name


@click.group(cls=AwsGroup, context_settings=CLI_CONTEXT)
@click.option("--bucket", help="overrides CLICKSTREAM_BUCKET")
@click.option("--name", help="model name (overrides CLICKSTREAM_MODEL_NAME)")
@click.pass_context
def cli(ctx, bucket, name):
    """Inspect and move the CURRENT model version; prune old versions.

    Settings come from CLICKSTREAM_* variables and the [train] section of the TOML file named by
    CLICKSTREAM_CONFIG (docs/training.md lists the keys); --bucket and --name override them.
    """
    logs.setup("WARNING")
    ctx.obj = _context(bucket, name)


@cli.command("ls")
@click.pass_obj
def ls(obj):
    """Every published version with its AUC and parity; * marks CURRENT."""
    s3, bucket, name = obj
    current = registry.current_version(s3, bucket, name)
    found = registry.versions(s3, bucket, name)
    if not found:
        _say_none(s3, bucket, name)
    for version in found:
        try:
            meta = registry.load(s3, bucket, name, version).meta
        except LookupError:
            click.echo(f"  {version}  (incomplete bundle)")
            continue
        auc = meta.get("metrics", {}).get("roc_auc")
        parity = meta.get("parity", {})
        click.echo(f"{'*' if version == current else ' '} {version}  {meta.get('algorithm', '?'):4}  "
                   f"auc {auc:.4f}  parity {'ok' if parity.get('passed') else 'FAILED'} "
                   f"({parity.get('max_abs_diff', float('nan')):.1e})  created {meta.get('created_at')}"
                   if auc is not None else f"{'*' if version == current else ' '} {version}")


def _say_none(s3, bucket: str, name: str) -> None:
    """On stderr: no version of ``name``, and which models the bucket does hold (a misspelt --name)."""
    others = registry.model_names(s3, bucket)
    click.echo(f"no version of model {name!r} in s3://{bucket}/{registry.PREFIX}/{name}/"
               + (f" (models there: {', '.join(others)})" if others else " (no model published there)"), err=True)


@cli.command()
@click.pass_obj
def current(obj):
    """The CURRENT version and its model.json."""
    s3, bucket, name = obj
    try:
        bundle = registry.load(s3, bucket, name)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({k: bundle.meta.get(k) for k in ("name", "version", "algorithm", "feature_version",
                                                          "threshold", "parity", "promotion", "created_at")},
                          indent=2))
    click.echo(f"roc_auc {bundle.meta['metrics']['roc_auc']:.4f}")


@cli.command()
@click.pass_obj
def history(obj):
    """Every move of CURRENT, oldest first."""
    s3, bucket, name = obj
    moves = registry.recorded_moves(s3, bucket, name)
    if not moves:
        _say_none(s3, bucket, name)
    for entry, made in moves:
        # A move that lost its race for CURRENT, or crashed between its two writes: recorded, never made.
        click.echo(f"{entry.get('at')}  {entry['previous'] or '-'} -> {entry['version']}  ({entry.get('reason')})"
                   + ("" if made else "  [not made]"))


def servable(s3, bucket: str, name: str, version: str, force: bool) -> None:
    """Refuse (ClickException) a version the scorers could not serve: a bundle that is incomplete,
    gone or unreadable; unless ``force``, one whose parity failed or, under the scorers' model name,
    whose features are not this code's (scorers refuse it and keep serving what they have)."""
    if version not in (found := registry.versions(s3, bucket, name)):
        raise click.ClickException(f"model {name!r} has no version {version!r} in s3://{bucket}; its versions: "
                                   f"{', '.join(found[-5:]) or 'none'} (newest last; `ls` lists them all)")
    try:
        bundle = registry.load(s3, bucket, name, version)
        _probe(bundle)
    except (LookupError, ValueError) as exc:
        raise click.ClickException(f"model {name!r} has no complete, readable version {version} in "
                                   f"s3://{bucket} ({exc})") from None
    meta = bundle.meta
    if force:
        return
    if not meta.get("parity", {}).get("passed"):
        raise click.ClickException(f"version {version} did not pass the export parity check; use --force to insist")
    if name == registry.DEFAULT_MODEL and not registry.has_fold_features(meta):
        raise click.ClickException(
            f"version {version} has feature_version {meta.get('feature_version')!r}, not this code's "
            f"{FEATURE_VERSION!r}: scorers running this code would refuse it and keep serving their model; "
            "use --force if the scorers that will load it compute its features (mid-rollout, the scorers not yet "
            "upgraded do), or run this command with the code of that version")


def _probe(bundle: registry.Bundle) -> None:
    """Score one row of zeros with the bundle's model.onnx as model.json describes it (ValueError if
    it cannot): a bundle whose model.json reads fine may still hold an ONNX file the scorers refuse."""
    onnx_meta = bundle.meta.get("onnx") or {}
    row = np.zeros((1, len(registry.feature_names(bundle.meta))), dtype=np.float32)
    try:
        session = onnxruntime.InferenceSession(bundle.onnx, providers=["CPUExecutionProvider"])
        session.run([onnx_meta.get("probability_output", "probability")], {onnx_meta.get("input", "features"): row})
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no class but Exception
        raise ValueError(f"model.onnx does not score a row as model.json describes: {str(exc).strip()[:200]}") from None


@cli.command()
@click.argument("version")
@click.option("--force", is_flag=True, help="promote even when its parity failed or its features are not this code's")
@click.pass_obj
def promote(obj, version, force):
    """Move CURRENT to VERSION (a complete bundle with passing parity and the scorers' features)."""
    s3, bucket, name = obj
    servable(s3, bucket, name, version, force)
    if registry.current_version(s3, bucket, name) == version:
        click.echo(f"{version} is already CURRENT of {name}; nothing moved")
        return
    try:
        registry.set_current(s3, bucket, name, version, reason="promoted by hand")
    except registry.Conflict as exc:
        raise click.ClickException(f"{exc}; look again (ls, history) and retry") from None
    click.echo(f"CURRENT of {name} is now {version}")


@cli.command()
@click.option("--force", is_flag=True, help="roll back even when its parity failed or its features are not this code's")
@click.pass_obj
def rollback(obj, force):
    """Move CURRENT back to the version it pointed to before its last move (checked as promote does)."""
    s3, bucket, name = obj
    try:
        version = registry.rollback(s3, bucket, name, check=lambda target: servable(s3, bucket, name, target, force))
    except (LookupError, registry.Conflict) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"CURRENT of {name} rolled back to {version}")


@cli.command()
@click.option("--keep", type=click.IntRange(min=1), default=30, show_default=True,
              help="how many of the newest versions to keep, and of CURRENT's latest moves to keep rollbacks for")
@click.option("--dry-run", is_flag=True, help="list the versions it would delete; delete nothing")
@click.option("--yes", is_flag=True, help="delete without asking (for a scheduled job)")
@click.pass_obj
def prune(obj, keep, dry_run, yes):
    """Delete the bundles of old versions. Kept: the newest KEEP, CURRENT, and the versions CURRENT
    pointed to in its last KEEP moves, so `rollback` still finds them. HISTORY is never pruned."""
    s3, bucket, name = obj
    doomed, found = registry.old_versions(s3, bucket, name, keep)
    if not doomed:
        click.echo(f"nothing to prune: model {name!r} has {found} version{'s' * (found != 1)}, "
                   f"all kept with --keep {keep}")
        return
    click.echo(f"{len(doomed)} of {found} versions of {name!r} to delete: "
               + (", ".join(doomed) if len(doomed) <= 6 else f"{doomed[0]} ... {doomed[-1]}"))
    if dry_run:
        return
    if not yes:
        click.confirm("delete them?", abort=True)
    deleted = files = 0
    with click.progressbar(doomed, label="deleting", file=sys.stderr) as bar:
        for version in bar:
            try:
                removed = registry.delete_unless_current(s3, bucket, name, version)
            except OSError as exc:
                raise click.ClickException(f"{exc}; {deleted} versions deleted before it, run prune again") from None
            if removed is None:
                click.echo(f"\n{version} became CURRENT meanwhile: kept", err=True)
                continue
            files += removed
            deleted += 1
    click.echo(f"deleted {deleted} versions of {name!r} ({files} files)")


if __name__ == "__main__":
    sys.exit(cli())
