"""mergekit-multi recipes: several merges in one YAML file, later ones reading earlier ones by name.

A recipe is a YAML stream of merge configs separated by `---`. Each document but one has a `name:`:
it is a stage, which later documents may name as a `model:`, `base_model:` or slice source (a stage
name wins over a folder of that name, as in mergekit-multi). The document without a name is the
final merge, the one written to OUTPUT_DIR.

Unlike mergekit-multi, no stage is written to disk unless asked (`--intermediate-dir`): the merge
reading a stage reads it as a `pipeline.recipe.StageCheckpoint`, whose tensors are computed when
read, rounded to the stage's output dtype exactly as the stage's own run writes them. Everything
else (resume, workers, the fingerprint) is the plain merge's. docs/recipes.md has the details.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from streammerge.constants import DEFAULT_MAX_MEMORY, DEFAULT_MAX_SHARD_SIZE
from streammerge.errors import ConfigError, MismatchError
from streammerge.front.config import MergeConfig, ModelSpec, OutputSlice, SliceSource

log = logging.getLogger(__name__)

# Characters a stage name cannot hold: it names a folder under --intermediate-dir, and '+' / '@'
# would read as model+lora / a Hub revision.
_BAD_NAME_CHARS = "/\\+@\x00"


@dataclass(frozen=True)
class Recipe:
    """The named stages of a recipe, in file order; each config reads the others through `stage`."""

    stages: tuple[tuple[str, MergeConfig], ...]

    def names(self) -> list[str]:
        return [n for n, _ in self.stages]

    def stage(self, name: str) -> MergeConfig | None:
        """Stage `name`'s config, able to read the other stages; None if there is no such stage."""
        cfg = dict(self.stages).get(name)
        return None if cfg is None else replace(cfg, recipe=self)

    def own(self, name: str) -> MergeConfig:
        """Stage `name`'s config as written (reading the other stages by name only)."""
        return dict(self.stages)[name]

    def reads(self, cfg: MergeConfig) -> list[str]:
        """The stages `cfg` reads directly, each once, in the order it names them."""
        names = set(self.names())
        return list(dict.fromkeys(s for _, s in _sources(cfg) if s in names))

    def order(self, cfg: MergeConfig | None = None) -> list[str]:
        """The stages `cfg` needs (every stage if None), each after the stages it reads."""
        out: list[str] = []

        def visit(name: str) -> None:
            if name not in out:
                for dep in self.reads(self.own(name)):
                    visit(dep)
                out.append(name)

        for name in (self.names() if cfg is None else self.reads(cfg)):
            visit(name)
        return out

    def to_list(self) -> list[dict]:
        """The stages as mergekit-multi documents (for the manifest and the model card)."""
        return [{"name": n, **c.to_dict()} for n, c in self.stages]

    def map(self, fn: Callable[[MergeConfig], MergeConfig]) -> Recipe:
        """The recipe with `fn` applied to every stage's config (the CLI's overrides)."""
        return Recipe(tuple((n, fn(c)) for n, c in self.stages))


def recipe_config(docs: list[Any], path: Path) -> MergeConfig:
    """The final merge of a recipe (the YAML documents of `path`), carrying the named stages.

    Raises:
        ConfigError: every problem, each naming its stage: a duplicate name, a second unnamed
            document or none, a name that is neither a stage nor a model folder, a cycle, and each
            stage's own config problems.
    """
    problems: list[str] = []
    named: dict[str, MergeConfig] = {}
    final: MergeConfig | None = None
    base_dir = str(path.parent)
    for i, doc in enumerate(docs):
        where = f"document {i + 1}"
        if not isinstance(doc, dict):
            problems.append(f"{where}: must be a mapping with merge_method, models, ... (and name: for a stage)")
            continue
        name = doc.get("name")
        if name is not None:
            bad = _name_problem(name)
            if bad:
                problems.append(f"{where}: name: {bad}")
                continue
            where = f"stage {name!r}"
            if name in named:
                problems.append(f"{where}: the name is used twice (again in document {i + 1}); give each stage its own name")
                continue
        elif final is not None:
            problems.append(f"{where}: a second document without a name; a recipe has one final merge (no name:), "
                            "every other document needs a name:")
            continue
        try:
            cfg = MergeConfig.from_dict({k: v for k, v in doc.items() if k != "name"}, base_dir=base_dir)
        except ConfigError as e:
            problems += [f"{where}: {p}" for p in e.problems]
            cfg = None
        if name is None:
            final = cfg if cfg is not None else MergeConfig(method="", models=())
        elif cfg is not None:
            named[name] = cfg
    if final is None:  # (a second unnamed document is only reported once a first one was final)
        problems.append(f"{path}: no final merge: every document has a name; add one without name: (the merge written "
                        "to OUTPUT_DIR) that reads the stages")
    if problems:
        raise ConfigError(problems)
    recipe = Recipe(tuple(named.items()))
    for name, cfg in [*named.items(), (None, final)]:
        problems += _source_problems(recipe, name, cfg)
    problems += _cycles(recipe)
    if problems:
        raise ConfigError(problems)
    unused = [n for n in recipe.names() if n not in recipe.order(final)]
    if unused:
        log.warning("%s: stage(s) %s: not read by the final merge, so not computed (--intermediate-dir writes every stage)",
                    path, ", ".join(repr(n) for n in unused))
    return replace(final, recipe=recipe)


def _name_problem(name: Any) -> str | None:
    if not isinstance(name, str) or not name.strip():
        return f"must be a non-empty string, got {name!r}"
    if name in (".", "..") or name.startswith("-") or any(c in name for c in _BAD_NAME_CHARS):
        return f"{name!r} cannot name a stage (it names a folder under --intermediate-dir): use letters, digits, '-', '_', '.'"
    return None


def _sources(cfg: MergeConfig) -> list[tuple[str, str]]:
    """(config key, model) for every model a config reads."""
    out = [("base_model", cfg.base)] if cfg.base is not None else []
    if cfg.slices:
        for i, sl in enumerate(cfg.slices):
            out += [(f"slices[{i}].sources[{j}].model", s.source) for j, s in enumerate(sl.sources)]
            out += [(f"slices[{i}].base_model", sl.base)] if sl.base else []
    else:
        out += [(f"models[{i}].model", m.source) for i, m in enumerate(cfg.models)]
    return out


def _source_problems(recipe: Recipe, name: str | None, cfg: MergeConfig) -> list[str]:
    """A stage read as model+lora or with a revision, as a tokenizer source, and names that are
    neither a stage nor a model folder (a Hub repo id is always org/name)."""
    where = "final merge" if name is None else f"stage {name!r}"
    names = set(recipe.names())
    problems = []
    for key, source in _sources(cfg):
        if source in names:
            continue
        head = source.partition("+")[0].partition("@")[0]
        if head in names:
            problems.append(f"{where}: {key}: {source!r}: a stage read with a LoRA (+) or a revision (@) is not supported; "
                            "merge the adapter in a stage of its own")
        elif "/" not in source and "\\" not in source and not os.path.exists(cfg._path(source)):
            known = ", ".join(repr(n) for n in recipe.names()) or "none"
            problems.append(f"{where}: {key}: {source!r} is neither a stage of this recipe (stages: {known}) nor a model folder")
    tokenizer = cfg.tokenizer_settings()[0]
    if tokenizer in names:
        problems.append(f"{where}: tokenizer source {tokenizer!r} is a stage, which is not supported yet; use base or union "
                        "(the stage's own tokenizer comes with it)")
    return problems


def _cycles(recipe: Recipe) -> list[str]:
    """Each cycle among the stages, once: 'a' -> 'b' -> 'a'."""
    configs = dict(recipe.stages)
    state: dict[str, int] = {}  # 1 on the path, 2 done
    found: list[str] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in recipe.reads(configs[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                found.append(f"stage {dep!r}: reads itself through {' -> '.join(repr(n) for n in cycle)}; a stage can "
                             "only read stages that do not read it back")
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in recipe.names():
        if name not in state:
            visit(name, [name])
    return found


# ---- opening stages as checkpoints ---------------------------------------------------------------


@dataclass
class StageOptions:
    """The plan options every stage is opened with (the final merge's), and the stages opened so
    far: a stage read by several others is one checkpoint, computed once per tensor."""

    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    max_memory: int = DEFAULT_MAX_MEMORY
    shard_order: str = "file"
    allow_crimes: bool = False
    compile: str = "auto"  # the CPU kernel (engine.compiled_kernel)
    opened: dict[str, Any] = field(default_factory=dict)


def open_stage(recipe: Recipe, name: str, stack: ExitStack, options: StageOptions):
    """Stage `name` as a StageCheckpoint: its inputs opened (stages in turn), its plan built from
    their headers; closed with `stack`. Errors name the stage."""
    if name in options.opened:
        if isinstance(options.opened[name], Exception):  # read by several stages: one failure, raised again
            raise options.opened[name]
        return options.opened[name]
    try:
        stage = _open_stage(recipe, name, stack, options)
    except (ConfigError, MismatchError) as e:
        options.opened[name] = e
        raise
    options.opened[name] = stage
    return stage


def _open_stage(recipe: Recipe, name: str, stack: ExitStack, options: StageOptions):
    from streammerge.front import api
    from streammerge.pipeline.recipe import StageCheckpoint

    cfg = recipe.stage(name)
    where = f"stage {name!r}: "

    def named(problems: list[str]) -> list[str]:
        return [p if p.startswith("stage '") else where + p for p in problems]

    try:
        reference, finetuned = api._open(cfg, stack, options)
        plan, tokenizer_from = api._build_plan(cfg, reference, finetuned, options.max_shard_size, options.max_memory,
                                               options.shard_order, options.allow_crimes)
    except MismatchError as e:
        raise MismatchError(named(e.problems), named(e.details)) from None
    except ConfigError as e:
        raise ConfigError(named(e.problems)) from None
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="streammerge-stage-")))
    api._copy_side_files(reference, tokenizer_from, folder, plan)  # config.json, tokenizer: as its own run writes them
    stage = StageCheckpoint(name, plan, reference, finetuned, folder, api.plan_fingerprint(plan, [reference, *finetuned]),
                            options.compile)
    stack.callback(stage.close)
    return stage


# ---- the recipe as a graph (plan), and its stages on disk (--intermediate-dir) --------------------


def graph(cfg: MergeConfig) -> list[dict]:
    """The stages the final merge needs, in the order they are computed, then the final merge:
    {name (None for the final), method, dtype (the output dtype, None: the inputs' own), reads}."""
    from streammerge.pipeline.plan import output_dtype

    recipe = cfg.recipe
    names = set(recipe.names())

    def node(name: str | None, c: MergeConfig) -> dict:
        reads = [s if s in names else c._path(s) for s in dict.fromkeys(s for _, s in _sources(c))]
        return {"name": name, "method": c.method_name, "dtype": output_dtype(c), "reads": reads,
                "stage_reads": recipe.reads(c)}

    return [node(n, recipe.own(n)) for n in recipe.order(cfg)] + [node(None, cfg)]


def with_paths(cfg: MergeConfig, paths: dict[str, str]) -> MergeConfig:
    """`cfg` reading the stages in `paths` (stage name -> folder) from disk."""
    def path(source: str | None) -> str | None:
        return paths.get(source, source) if source is not None else None

    slices = tuple(OutputSlice(tuple(SliceSource(path(s.source), s.layer_range, s.parameters) for s in sl.sources),
                               sl.parameters, path(sl.base)) for sl in cfg.slices)
    models = tuple(ModelSpec(path(m.source), m.parameters) for m in cfg.models)
    return replace(cfg, base=path(cfg.base), models=models, slices=slices)


def write_stages(cfg: MergeConfig, directory: str | os.PathLike, run: Callable[[MergeConfig, Path], Any]) -> MergeConfig:
    """Writes every named stage to `directory`/NAME with `run(config, folder)` (a normal merge,
    resumed like one), each after the stages it reads, which it reads from there; returns the final
    merge reading them from there too."""
    recipe = cfg.recipe
    paths: dict[str, str] = {}
    for name in recipe.order():
        folder = Path(directory) / name
        run(with_paths(replace(recipe.own(name), recipe=None), paths), folder)
        paths[name] = str(folder.resolve())
    return with_paths(replace(cfg, recipe=None), paths)
