"""docs/trl.md's two DPOConfig tables against the installed TRL (1.16) itself, so that neither can
drift: the field table names every field DPOConfig adds to transformers' TrainingArguments and
every field EPAConfig adds to DPOConfig, and nothing else that does not exist; the flag table maps
only names DPOConfig or DPOTrainer still has; the loss types and refusals the field table states
are what check_config does. Only the dataclasses and check_config run here: no model, no data."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

pytest.importorskip("trl")

import transformers  # noqa: E402
import trl  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from epa_ext.integrations.trl import SUPPORTED_LOSS_TYPES, EPAConfig, check_config  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "trl.md"
FIELD_TABLE = "DPOConfig's fields (TRL 1.16) as EPATrainer takes them"
FLAG_TABLE = "## Coming from TRL: DPOConfig fields as epa-train flags"
EPA_PREFIX = "EPAConfig:"


def table(title: str) -> list[list[str]]:
    """The cells of the body rows of the first Markdown table after the line that starts with title."""
    lines = DOC.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(title)), None)
    assert start is not None, f"docs/trl.md has no line starting with {title!r}: keep the heading or update this test"
    rows, seen_table = [], False
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            if seen_table:
                break
            continue
        seen_table = True
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])])
    assert len(rows) > 2, f"no table found under {title!r} in docs/trl.md"
    return rows[2:]  # past the header and its separator


def names(cell: str) -> list[str]:
    """The identifiers a cell names in backticks, leaving out parenthesized remarks:
    "`fsdp` (FSDP2: `fsdp_version: 2`)" names fsdp; "`report_to="tensorboard"`" names report_to."""
    return re.findall(r"`([A-Za-z_]\w*)[^`]*`", re.sub(r"\([^)]*\)", "", cell))


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def dpo_config_added_fields() -> set[str]:
    return field_names(DPOConfig) - field_names(transformers.TrainingArguments)


def field_table_names() -> tuple[set[str], set[str]]:
    """(DPOConfig field names, EPAConfig field names) of the field table's first column."""
    dpo, epa = set(), set()
    for row in table(FIELD_TABLE):
        (epa if row[0].startswith(EPA_PREFIX) else dpo).update(names(row[0]))
    return dpo, epa


def field_row(field: str) -> list[str]:
    (row,) = [row for row in table(FIELD_TABLE) if field in names(row[0])]
    return row


def test_the_field_table_has_a_row_for_every_field_dpo_config_adds():
    documented, _ = field_table_names()
    missing = sorted(dpo_config_added_fields() - documented)
    assert not missing, (f"docs/trl.md's field table has no row for DPOConfig's {missing} (TRL "
                         f"{trl.__version__}): add one saying how EPATrainer takes each")


def test_the_field_table_names_no_field_dpo_config_lacks():
    documented, _ = field_table_names()
    stale = sorted(documented - field_names(DPOConfig))
    assert not stale, (f"docs/trl.md's field table names {stale}, which DPOConfig (TRL "
                       f"{trl.__version__}) does not have: remove or rename those rows")


def test_the_field_table_names_exactly_the_fields_epa_config_adds():
    _, documented = field_table_names()
    own = field_names(EPAConfig) - field_names(DPOConfig)
    assert documented == own, (f"docs/trl.md's '{EPA_PREFIX}' rows: missing {sorted(own - documented)}, stale "
                               f"{sorted(documented - own)}")


def test_the_flag_table_maps_only_names_trl_has():
    """The epa-train flag table need not map every field (most have no flag), but each TRL name it
    maps must exist: a DPOConfig field or a DPOTrainer argument. The metrics row names metrics."""
    trainer_arguments = set(inspect.signature(DPOTrainer.__init__).parameters) - {"self"}
    mapped = {name for row in table(FLAG_TABLE) if not row[0].startswith("metrics") for name in names(row[0])}
    assert {"beta", "loss_type", "max_length"} <= mapped  # the parsing found the TRL column
    stale = sorted(mapped - field_names(DPOConfig) - trainer_arguments)
    assert not stale, (f"docs/trl.md's epa-train flag table maps {stale}, which neither DPOConfig nor DPOTrainer "
                       f"(TRL {trl.__version__}) has: map what replaced them")


def trl_loss_types() -> set[str]:
    """TRL's loss types, from the help of DPOConfig's loss_type field (TRL keeps no list of them)."""
    (loss_type,) = [f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type"]
    types = set(re.findall(r"`'(\w+)'`", loss_type.metadata["help"]))
    assert "sigmoid" in types and "sft" in types, f"TRL's loss_type help no longer lists the types: {types}"
    return types


def test_the_loss_type_row_is_what_check_config_accepts_and_covers_every_trl_type(tmp_path):
    cell = field_row("loss_type")[1]
    supported, refused = cell.split("refused:", 1)
    supported, refused = set(names(supported)), set(names(refused))
    assert "sft" in supported, "docs/trl.md's loss_type row no longer says each type takes TRL's 'sft' term"
    assert supported == set(SUPPORTED_LOSS_TYPES), (f"docs/trl.md says EPATrainer takes the loss types "
                                                    f"{sorted(supported)}; check_config takes {SUPPORTED_LOSS_TYPES}")
    uncovered = sorted(trl_loss_types() - supported - refused)
    assert not uncovered, f"docs/trl.md's loss_type row says nothing of TRL's loss types {uncovered}"

    def config(loss_type):
        # TRL's own rule: exo_pair needs label_smoothing > 0
        smoothing = 1e-3 if "exo_pair" in loss_type else 0.0
        return DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, loss_type=loss_type,
                         label_smoothing=smoothing)

    for loss_type in sorted(refused):
        with pytest.raises(ValueError, match="loss_type must be one of"):
            check_config(config(loss_type))
    for loss_type in sorted(supported - {"epa"}):  # "epa" is EPAConfig's: DPOConfig's own check refuses it
        check_config(config(loss_type))
        check_config(config([loss_type, "sft"]))


# A value, set after the config is made, of each field the table says EPATrainer refuses (or takes
# only one value of), and the name check_config's message gives it.
REFUSED = {
    "deepspeed": ({"deepspeed": "ds_config.json"}, "DeepSpeed"),
}


def test_the_fields_the_table_refuses_are_refused(tmp_path):
    refused_rows = {names(row[0])[0] for row in table(FIELD_TABLE)
                    if row[1].startswith(("refused", "only")) and not row[0].startswith(EPA_PREFIX)}
    assert refused_rows == set(REFUSED), f"rows saying 'refused' or 'only': {sorted(refused_rows)}; update REFUSED"
    for field, (values, named) in REFUSED.items():
        args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
        for key, value in values.items():
            setattr(args, key, value)
        with pytest.raises(ValueError, match=named):
            check_config(args)
