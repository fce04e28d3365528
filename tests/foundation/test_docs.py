"""The docs a stranger starts from say what the code does: every settings key in its component's doc,
every model.json field in contracts.md, and README's word on make targets matching the Makefile."""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from common.config import SECTION_KEYS

ROOT = Path(__file__).resolve().parents[2]


def _scope(text: str, heading: str) -> str:
    """The part of a Markdown text under the first heading that starts with ``heading``, up to the
    next heading of the same or a higher level."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    level = len(heading) - len(heading.lstrip("#"))
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("#") and len(lines[i]) - len(lines[i].lstrip("#")) <= level), len(lines))
    return "\n".join(lines[start:end])


def _table_keys(text: str) -> set[str]:
    """The names in the first column of the Markdown tables of ``text``."""
    keys = set()
    for line in text.splitlines():
        if line.startswith("|"):
            keys |= set(re.findall(r"\b[a-z][a-z0-9_]*\b", line.split("|")[1]))
    return keys


# section -> (doc, heading of the part that lists its keys)
KEY_DOCS = {"collector": ("docs/collector.md", "## Configuration"), "enrich": ("docs/enrich.md", "## Configuration"),
            "scorer": ("docs/scorer.md", "## Configuration"), "lake": ("docs/lake.md", "## Config ("),
            "train": ("docs/training.md", "## Config ("), "discount": ("docs/discount-engine.md", "## Settings"),
            "web": ("docs/traffic-generator.md", "## The demo shop"),
            "liveview": ("docs/liveview.md", "### Settings (`[liveview]`"),
            "summary": ("docs/liveview.md", "## Terminal summary")}


@pytest.mark.parametrize("section", sorted(KEY_DOCS))
def test_every_settings_key_is_in_its_components_doc(section):
    doc, heading = KEY_DOCS[section]
    documented = _table_keys(_scope((ROOT / doc).read_text(encoding="utf-8"), heading))
    missing = sorted(SECTION_KEYS[section] - documented)
    assert not missing, f"[{section}] keys not in the table under {heading!r} of {doc}: {missing}"


def test_the_shared_and_provisioning_keys_are_in_the_readme():
    from common.config import AwsSettings

    text = _scope((ROOT / "README.md").read_text(encoding="utf-8"), "## Configuration")
    named = set(re.findall(r"`([a-z][a-z0-9_]*)`", text))
    expected = {field.name for field in dataclasses.fields(AwsSettings)} | SECTION_KEYS["provision"]
    assert expected <= named, sorted(expected - named)


# ----------------------------------------------------------------------------- model.json

def _tree(path: str) -> ast.Module:
    return ast.parse((ROOT / path).read_text(encoding="utf-8"))


def _is_meta(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "meta" or isinstance(node, ast.Name) and node.id == "meta"


def _dict_keys(node: ast.AST | None) -> set[str]:
    if not isinstance(node, ast.Dict):
        return set()
    return {key.value for key in node.keys if isinstance(key, ast.Constant) and isinstance(key.value, str)}


def _model_json_fields() -> tuple[set[str], set[str]]:
    """The top-level fields the trainer writes into model.json, and the fields nested in them, read
    from the code that builds it (so a field added there and not to contracts.md fails this test)."""
    top, nested = set(), set()
    for path in ("batch/train_model.py", "batch/train.py", "batch/train_table.py", "batch/train_publish.py"):
        tree = _tree(path)
        names = {target.id: node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 for target in node.targets if isinstance(target, ast.Name)}
        for node in ast.walk(tree):
            values = []
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and any(
                    isinstance(target, ast.Name) and target.id == "meta" for target in node.targets):
                top |= _dict_keys(node.value)                                   # meta = {...}
                values = list(node.value.values)
            elif isinstance(node, ast.Call) and (
                    isinstance(node.func, ast.Attribute) and node.func.attr == "update" and _is_meta(node.func.value)
                    or isinstance(node.func, ast.Name) and node.func.id == "dict" and node.args
                    and _is_meta(node.args[0])):
                top |= {keyword.arg for keyword in node.keywords if keyword.arg}  # meta.update(k=…), dict(meta, k=…)
                values = [keyword.value for keyword in node.keywords]
            elif isinstance(node, ast.Assign) and any(isinstance(target, ast.Subscript) and _is_meta(target.value)
                                                      for target in node.targets):
                top |= {target.slice.value for target in node.targets              # meta["k"] = …
                        if isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant)}
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_publish_bundle":
                values = list(node.args)                                        # its promotion record
            for value in values:
                nested |= _dict_keys(names.get(value.id) if isinstance(value, ast.Name) else value)
    for path, function in (("batch/train_metrics.py", "evaluate"), ("batch/train_metrics.py", "choose_threshold"),
                           ("batch/export.py", "as_meta")):
        body = next(node for node in ast.walk(_tree(path)) if isinstance(node, ast.FunctionDef) and node.name == function)
        nested |= set().union(*(_dict_keys(node.value) for node in ast.walk(body) if isinstance(node, ast.Return)))
    return top, nested


def test_every_model_json_field_is_in_contracts():
    top, nested = _model_json_fields()
    assert {"features", "onnx", "threshold", "feature_version", "metrics", "parity", "version"} <= top  # the reader works
    assert {"input", "probability_output", "positive_index", "opset", "split_at_ms", "roc_auc", "promoted"} <= nested
    section = _scope((ROOT / "docs/contracts.md").read_text(encoding="utf-8"), "### `model.json`")
    documented = set(re.findall(r"`([a-z_][a-z0-9_]*)(?:\.[a-z_][a-z0-9_]*)?`", section))
    documented |= set(re.findall(r"`[a-z_][a-z0-9_]*\.([a-z_][a-z0-9_]*)`", section))
    rows = _table_keys(section)
    assert not sorted(top - rows), f"model.json fields without a row in contracts.md: {sorted(top - rows)}"
    assert not sorted(nested - documented), f"nested model.json fields not in contracts.md: {sorted(nested - documented)}"


def test_the_docs_give_the_features_count_and_version_of_the_code():
    """A feature added or a version bumped leaves these figures behind unless a test reads them."""
    from common.features import FEATURE_COUNT, FEATURE_VERSION

    contracts, scorer = (ROOT / "docs/contracts.md").read_text(encoding="utf-8"), (ROOT / "docs/scorer.md").read_text(encoding="utf-8")
    assert set(re.findall(r"the (\d+) features of the scorer's fold", contracts)) == {str(FEATURE_COUNT)}
    assert set(re.findall(r"`feature_version` \| string \| `\"([^\"]+)\"`", contracts)) == {FEATURE_VERSION}
    assert set(re.findall(r"tensor `\[n, (\d+)\]`", scorer)) == {str(FEATURE_COUNT)}


# ----------------------------------------------------------------------------- README and the Makefile

def _recipe(target: str) -> str:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, flags=re.MULTILINE).group(1)


def test_the_readme_says_what_make_test_does_with_aws_endpoint_url():
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    unsets = all("env -u AWS_ENDPOINT_URL" in _recipe(target) for target in ("test", "test-fast"))
    if unsets:      # make test is hermetic: README must say so, and how to point the suite elsewhere
        assert "The test suite runs against whatever `AWS_ENDPOINT_URL` names" not in readme
        assert "`make test` and `make test-fast` always start their own moto server" in readme
        assert re.search(r"`AWS_ENDPOINT_URL=\S+ .*\.venv/bin/python -m pytest", readme)
    else:
        assert "runs against whatever `AWS_ENDPOINT_URL` names" in readme


def test_the_readmes_bench_example_names_the_report_it_writes():
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    example = re.search(r'`BENCH_ARGS="([^"]*)"`', readme)
    assert example, "README has no BENCH_ARGS example"
    source = (ROOT / "bench/__main__.py").read_text(encoding="utf-8")
    assert '"report-quick.md" if args.quick else "report.md"' in source      # what the next line relies on
    if "--quick" in example.group(1):
        after = readme[example.end():example.end() + 200]
        assert "`--quick` writes `bench/report-quick.md`" in after, after
