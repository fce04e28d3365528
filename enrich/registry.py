"""An Iglu-compatible schema resolver: registries in priority order, a TTL cache, compiled validators.

A registry is a static tree ``schemas/<vendor>/<name>/jsonschema/<version>``: the embedded one shipped in
``enrich/iglu``, a local folder, or the same tree served over HTTP. The resolver asks each registry in
order for the exact SchemaVer key, caches the outcome (a compiled validator for ``ttl`` seconds, a
miss with every registry's answer for ``miss_ttl``), and compiles a schema once per cache entry, because
compiling is ~1000x slower than validating.
"""
from __future__ import annotations

import dataclasses
import http.client
import logging
import re
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import fastjsonschema
import orjson
from fastjsonschema.draft04 import CodeGeneratorDraft04

from common.logs import Tally
from enrich import metrics
from enrich.enrichments import iso_ms, utc_now_ms

EMBEDDED = Path(__file__).resolve().parent / "iglu"
SELF_DESC_META = "http://iglucentral.com/schemas/com.snowplowanalytics.self-desc/schema/jsonschema/1-0-0#"
# Iglu schemas are JSON Schema draft-04, as Snowplow validates them: a boolean exclusiveMinimum means
# "strictly above minimum", where draft-07 would read it as "above True".
DRAFT_04 = "http://json-schema.org/draft-04/schema#"
# Keywords of later drafts that draft-04 ignores: a schema using them validates less than it says.
LATER_DRAFT_KEYWORDS = ("const", "contains", "propertyNames", "if", "then", "else")
# Real keys are ~100 characters (iglu:com.snowplowanalytics.snowplow.badrows/collector_payload_format_violation/
# jsonschema/1-0-0 is 95). Keys come from the input: the cap keeps made-up megabyte keys out of the resolver
# cache, and versions far below int()'s 4300-digit limit (above it int() raises a plain ValueError).
MAX_KEY_CHARS = 512
# The vendor is a reverse domain: dots between names, never a path step ("..") into a registry's tree.
_KEY = re.compile(r"iglu:([a-zA-Z0-9\-_]+(?:\.[a-zA-Z0-9\-_]+)*)/([a-zA-Z0-9\-_]+)/([a-zA-Z0-9\-_]+)/"
                  r"([1-9][0-9]*|0)-(0|[1-9][0-9]*)-(0|[1-9][0-9]*)\Z")
# Formats Iglu schemas use that fastjsonschema does not know; anything else unknown fails the lint
# (fastjsonschema itself ignores an unknown format, so "emial" would validate anything).
# "uri" is replaced: fastjsonschema's refuses schemes with "-", "+" or "." (android-app://...), which
# RFC 3986 allows and the trackers send as deep-link referrers.
FORMATS = {"uuid": r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
           "date": r"^\d{4}-\d{2}-\d{2}$",
           "uri": r"^[a-zA-Z][a-zA-Z0-9+.\-]*:[^\s]*$"}
KNOWN_FORMATS = frozenset(CodeGeneratorDraft04.FORMAT_REGEXS) | frozenset(FORMATS)

log = logging.getLogger(__name__)


class SchemaKeyError(ValueError):
    """A string is not an ``iglu:vendor/name/format/M-R-A`` key."""


@dataclass(frozen=True, order=True)
class SchemaKey:
    vendor: str
    name: str
    format: str
    model: int
    revision: int
    addition: int

    @classmethod
    def parse(cls, text: object) -> SchemaKey:
        if isinstance(text, str) and len(text) > MAX_KEY_CHARS:
            raise SchemaKeyError(f"an Iglu schema key is at most {MAX_KEY_CHARS} characters, "
                                 f"this one has {len(text)}: {text[:200]!r}")
        match = _KEY.match(text) if isinstance(text, str) else None
        if not match:
            raise SchemaKeyError(f"not an Iglu schema key (iglu:vendor/name/format/M-R-A): {str(text)[:200]!r}")
        vendor, name, fmt, model, revision, addition = match.groups()
        return cls(vendor, name, fmt, int(model), int(revision), int(addition))

    @classmethod
    def from_path(cls, path: Path) -> SchemaKey:
        """The key of a registry file ``…/vendor/name/format/M-R-A``; raises SchemaKeyError."""
        return cls.parse("iglu:" + "/".join(path.parts[-4:]))

    @property
    def version(self) -> str:
        return f"{self.model}-{self.revision}-{self.addition}"

    @property
    def path(self) -> str:
        return f"schemas/{self.vendor}/{self.name}/{self.format}/{self.version}"

    def __str__(self) -> str:
        return f"iglu:{self.vendor}/{self.name}/{self.format}/{self.version}"


class NotFound(Exception):
    """The registry answered that it does not have the schema (cacheable)."""


class RegistryError(Exception):
    """The registry could not be asked (network, bad JSON): transient, cached only briefly."""


class FolderRegistry:
    """A static registry on disk: ``<root>/schemas/<vendor>/<name>/jsonschema/<version>``."""

    def __init__(self, root: Path | str, name: str | None = None):
        self.root = Path(root)
        self.name = name or f"folder:{self.root}"

    def fetch(self, key: SchemaKey) -> dict:
        path = self.root / key.path
        try:
            return orjson.loads(path.read_bytes())
        except FileNotFoundError:
            raise NotFound(f"{path} does not exist") from None
        except (OSError, orjson.JSONDecodeError) as exc:
            raise RegistryError(f"{path}: {exc}") from None

    def schemas(self) -> list[SchemaKey]:
        found = []
        for path in sorted((self.root / "schemas").glob("*/*/*/*")):
            try:
                found.append(SchemaKey.from_path(path))
            except SchemaKeyError:
                continue
        return found


class HttpRegistry:
    """A static registry served over HTTP(S) at ``<base>/schemas/...`` (an Iglu static repo, S3, nginx)."""

    def __init__(self, base: str, timeout: float = 2.0):
        self.base = base.rstrip("/")
        self.name = f"http:{self.base}"
        self.timeout = timeout

    def fetch(self, key: SchemaKey) -> dict:
        url = f"{self.base}/{key.path}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                return orjson.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code in (403, 404):  # S3 answers 403 for a missing key without ListBucket
                raise NotFound(f"{url}: HTTP {exc.code}") from None
            raise RegistryError(f"{url}: HTTP {exc.code}") from None
        except (OSError, http.client.HTTPException, orjson.JSONDecodeError) as exc:
            raise RegistryError(f"{url}: {exc}") from None

    def schemas(self) -> list[SchemaKey]:
        return []  # a static HTTP registry has no listing


def _attempt(repository: str, error: str, message: str) -> dict:
    """One ``lookupHistory`` item as Snowplow's badrows schemas have it (error NotFound, RepoFailure
    or ClientFailure; the message within 256 characters)."""
    return {"repository": repository, "errors": [{"error": error, "message": message[:256]}],
            "attempts": 1, "lastAttempt": iso_ms(utc_now_ms())}


def registry_from(spec: str):
    """``embedded``, an http(s) URL, or a folder path (from the ``registries`` setting)."""
    if spec == "embedded":
        return FolderRegistry(EMBEDDED, "embedded")
    if spec.lower().startswith(("http://", "https://")):
        return HttpRegistry(spec)
    return FolderRegistry(spec)


@dataclass
class Resolved:
    """A cache entry: a validator, or the reasons every registry gave for not having the schema."""

    key: SchemaKey
    validate: Callable[[object], object] | None
    schema: dict | None
    history: list[dict]
    expires: float
    transient: bool = False             # a registry could not be asked: the miss may not be one


@dataclass
class Resolver:
    registries: list = field(default_factory=lambda: [registry_from("embedded")])
    ttl: float = 600.0
    # A schema no registry has is asked for again sooner: the runbook for its bad rows is "publish
    # the schema, then replay", and a replay within ttl would only make the same bad rows again.
    miss_ttl: float = 60.0
    error_ttl: float = 10.0
    clock: Callable[[], float] = time.monotonic
    # Schema keys come from the input: bounded, least recently used out, so a stream of made-up keys
    # cannot grow memory (a real pipeline uses a few hundred schemas at most). Misses are kept apart:
    # made-up keys would otherwise push the real schemas out, to be fetched and compiled again.
    max_entries: int = 4096
    max_misses: int = 1024
    # Made-up keys each cost a registry fetch (a round trip, up to the HTTP timeout), on the worker's
    # thread: lookups that find no schema may take at most this share of the time (over a 10 s burst),
    # beyond it a key not in the cache is a RepoFailure (a replayable bad row) without asking, until
    # the share allows again, and cached hits go on. Lookups that find one are never counted: a cold
    # start fetching the real schemas from a slow registry is not an attack.
    fetch_share: float = 0.2
    # A dead registry fails one fetch per schema key per error_ttl, i.e. per event on a busy stream.
    log_interval: float = 30.0
    _cache: OrderedDict[str, Resolved] = field(default_factory=OrderedDict)
    _misses: OrderedDict[str, Resolved] = field(default_factory=OrderedDict)
    _fetch_credit: float | None = None                           # seconds of fetching left; None: full
    _credit_at: float = 0.0
    _skipped: Tally = field(init=False)                           # lookups the fetch budget refused
    _outages: dict[str, Tally] = field(default_factory=dict)     # failed fetches per registry, for the log
    _warned: set[str] = field(default_factory=set)                # registries warned about, not answering since

    def __post_init__(self) -> None:
        self._skipped = Tally(self.log_interval, self.clock)

    @classmethod
    def from_specs(cls, specs: tuple[str, ...] | list[str], ttl: float = 600.0, miss_ttl: float = 60.0) -> Resolver:
        return cls([registry_from(spec) for spec in specs], ttl=ttl, miss_ttl=miss_ttl)

    def lookup(self, key: str | SchemaKey) -> Resolved:
        """The cached resolution of ``key``; raises SchemaKeyError for a malformed key."""
        text = str(key)
        now = self.clock()
        cached = self._cache.get(text) or self._misses.get(text)
        if cached is not None and cached.expires > now:
            (self._cache if cached.validate else self._misses).move_to_end(text)
            return cached
        entry = self._resolve(key if isinstance(key, SchemaKey) else SchemaKey.parse(text))
        if entry.validate is None and entry.transient and cached is not None and cached.validate is not None:
            # The registries cannot be asked now (down, or the fetch budget spent): a schema they
            # served stays in use rather than turning every event that needs it into a bad row.
            entry = dataclasses.replace(cached, expires=now + min(self.error_ttl, self.ttl))
        self._store(text, entry)
        return entry

    def _store(self, text: str, entry: Resolved) -> None:
        self._cache.pop(text, None)
        self._misses.pop(text, None)
        table, limit = (self._cache, self.max_entries) if entry.validate else (self._misses, self.max_misses)
        table[text] = entry
        if len(table) > limit:
            table.popitem(last=False)

    def _may_fetch(self) -> bool:
        now = self.clock()
        burst = self.fetch_share * 10.0
        credit = burst if self._fetch_credit is None else self._fetch_credit
        self._fetch_credit = min(burst, credit + (now - self._credit_at) * self.fetch_share)
        self._credit_at = now
        return self._fetch_credit > 0

    def _resolve(self, key: SchemaKey) -> Resolved:
        if not self._may_fetch():
            return self._not_asked(key)
        started = self.clock()
        entry = self._ask_registries(key)
        if entry.validate is None:
            self._fetch_credit -= self.clock() - started
        return entry

    def _not_asked(self, key: SchemaKey) -> Resolved:
        message = (f"lookups of schemas no registry has took more than {self.fetch_share:.0%} of the enricher's "
                   f"time lately (events naming made-up schemas): {key} was not looked up")
        if skipped := self._skipped.add():
            log.warning("%s; %d lookups skipped since the last such line", message, skipped)
        history = [_attempt("resolver", "RepoFailure", message)]
        # Asked again once the share allows: a real schema is not refused for a whole error_ttl.
        allowed_in = -self._fetch_credit / self.fetch_share
        expires = self.clock() + min(self.error_ttl, self.ttl, max(allowed_in, 0.1))
        return Resolved(key, None, None, history, expires, transient=True)

    def _ask_registries(self, key: SchemaKey) -> Resolved:
        history, transient = [], False
        for registry in self.registries:
            try:
                schema = registry.fetch(key)
            except NotFound as exc:
                self._answered(registry.name)
                history.append(_attempt(registry.name, "NotFound", str(exc)))
                continue
            except RegistryError as exc:
                transient = True
                self._failed(registry.name, exc)
                history.append(_attempt(registry.name, "RepoFailure", str(exc)))
                continue
            self._answered(registry.name)
            try:
                served_as(schema, key)
                validate = compile_schema(schema)
            except ValueError as exc:
                history.append(_attempt(registry.name, "RepoFailure", f"invalid schema: {exc}"))
                continue
            return Resolved(key, validate, schema, history, self.clock() + self.ttl)
        ttl = self.error_ttl if transient else self.miss_ttl
        return Resolved(key, None, None, history, self.clock() + min(ttl, self.ttl), transient)

    def _failed(self, name: str, exc: RegistryError) -> None:
        metrics.REGISTRY_ERRORS.labels(name).inc()
        failed = self._outages.setdefault(name, Tally(self.log_interval, self.clock)).add()
        if not failed:
            return
        # Say it is the registry: otherwise the only sign is schema_violations bad rows, like a broken tracker.
        log.warning("schema registry %s unreachable: %d fetch(es) failed since the last report (last: %s); events "
                    "needing a schema only it holds become schema_violations bad rows; retried after %g s",
                    name, failed, exc, min(self.error_ttl, self.ttl))
        self._warned.add(name)

    def _answered(self, name: str) -> None:
        if name in self._warned:
            self._warned.discard(name)
            outage = self._outages[name]
            log.info("schema registry %s answers again (%d more fetch(es) had failed since the last warning)",
                     name, outage.count)
            outage.count = 0

    def validate(self, key: str, data: object) -> list[str]:
        """Validator messages for ``data`` against ``key`` (empty when valid); raises LookupError when unresolved."""
        entry = self.lookup(key)
        if entry.validate is None:
            raise LookupError(entry.history)
        try:
            entry.validate(data)
        except fastjsonschema.JsonSchemaValueException as exc:
            return [exc.message]
        return []

    def schemas(self) -> list[tuple[str, SchemaKey]]:
        return [(registry.name, key) for registry in self.registries for key in registry.schemas()]


def _no_remote_ref(uri: str) -> None:
    # fastjsonschema would fetch it with urlopen and no timeout: one registry answering slowly held
    # the enricher's thread, and its shard, for as long as it liked.
    raise ValueError(f"$ref {uri!r} points outside the schema: Iglu schemas must be self-contained")


NO_REMOTE_REFS = dict.fromkeys(("http", "https", "file", "ftp", "iglu", "data"), _no_remote_ref)


def compile_schema(schema: object) -> Callable[[object], object]:
    """A validator that leaves the data as it is: fastjsonschema's default (use_default) writes each
    missing property's ``default`` into it, which Snowplow never does, and a default the schema's
    own bounds refuse (quantity 0 with minimum 1) reached the features."""
    if not isinstance(schema, dict):
        raise ValueError("a schema must be a JSON object")  # noqa: TRY004 - callers catch ValueError for every schema problem
    body = {k: v for k, v in schema.items() if k not in ("self", "$schema")} | {"$schema": DRAFT_04}
    try:
        return fastjsonschema.compile(body, handlers=NO_REMOTE_REFS, formats=FORMATS, use_default=False)
    except fastjsonschema.JsonSchemaDefinitionException as exc:
        raise ValueError(f"schema does not compile: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - fastjsonschema raises plain errors on some broken schemas
        raise ValueError(f"schema does not compile: {type(exc).__name__}: {exc}") from None


def _subschemas(node: object) -> list[dict]:
    """Every schema object in ``node``, itself included; names under ``properties`` are not keywords."""
    if isinstance(node, list):
        return [sub for item in node for sub in _subschemas(item)]
    if not isinstance(node, dict):
        return []
    found = [node]
    for keyword, value in node.items():
        if keyword in ("enum", "default", "examples", "const"):                # data, not schemas
            continue
        named = keyword in ("properties", "patternProperties", "definitions", "dependencies")
        for child in (value.values() if named and isinstance(value, dict) else [value]):
            found += _subschemas(child)
    return found


def _draft_problems(schema: dict) -> list[str]:
    problems = []
    for node in _subschemas({k: v for k, v in schema.items() if k != "self"}):   # self.format is "jsonschema"
        own = node.get("format")
        if isinstance(own, str) and own not in KNOWN_FORMATS:
            problems.append(f"unknown format {own!r}: it would validate anything")
        problems += [f"{word!r} is not draft-04 (Iglu's draft): it would be ignored"
                     for word in LATER_DRAFT_KEYWORDS if word in node]
        problems += [f"{word} must be true or false in draft-04, with {word.replace('exclusiveM', 'm')} the bound"
                     for word in ("exclusiveMinimum", "exclusiveMaximum")
                     if word in node and not isinstance(node[word], bool)]
    return problems


def declared_key(schema: dict) -> SchemaKey:
    """The key a schema's ``self`` names; ValueError when it names none."""
    me = schema.get("self")
    if not isinstance(me, dict) or not all(isinstance(me.get(k), str) for k in ("vendor", "name", "format", "version")):
        raise ValueError("self must hold vendor, name, format and version strings")
    try:
        return SchemaKey.parse(f"iglu:{me['vendor']}/{me['name']}/{me['format']}/{me['version']}")
    except SchemaKeyError as exc:
        raise ValueError(f"self: {exc}") from None


def served_as(schema: object, key: SchemaKey) -> None:
    """ValueError unless ``schema`` says it is ``key``: a registry's error page answered with 200, or
    another schema's file copied to this path, validated events against the wrong rules."""
    if not isinstance(schema, dict):
        raise ValueError("a schema must be a JSON object")  # noqa: TRY004 - callers catch ValueError for every schema problem
    declared = declared_key(schema)
    if declared != key:
        raise ValueError(f"self says {declared}, not {key}")


def lint(schema: object, key: SchemaKey | None = None) -> list[str]:
    """Problems that would make a schema unusable or surprising in an Iglu registry (empty when fine)."""
    if not isinstance(schema, dict):
        return ["a schema must be a JSON object"]
    problems = []
    if schema.get("$schema") != SELF_DESC_META:
        problems.append(f"$schema must be {SELF_DESC_META}")
    try:
        declared = declared_key(schema)
        if key is not None and declared != key:
            problems.append(f"self says {declared} but the file is at {key}")
    except ValueError as exc:
        problems.append(str(exc))
    if "description" not in schema:
        problems.append("no description")
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        problems.append("object schema without additionalProperties: unknown fields would pass silently")
    problems += _draft_problems(schema)
    try:
        compile_schema(schema)
    except ValueError as exc:
        problems.append(str(exc))
    return problems
