"""Organ names: the groups a dataset config selects by name, and how they match source labels.

A dataset config names organ *groups* (e.g. `kidney`); each group matches every source label
whose name is in its alias set (TotalSegmentator's `kidney_left`/`kidney_right`, KiTS's
`kidney`, ...). A name that is not a group matches a source label of exactly that name, so any
TotalSegmentator class (`pancreas`, `aorta`, ...) can be selected too.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

LUNG_LOBES = (
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
)

# Group name -> source label names it covers.
ORGAN_GROUPS: Mapping[str, tuple[str, ...]] = {
    "kidney": ("kidney", "kidney_left", "kidney_right"),
    "liver": ("liver",),
    "spleen": ("spleen",),
    "lung": ("lung", "lung_left", "lung_right") + LUNG_LOBES,
    "kidney_tumor": ("kidney_tumor", "kidney_tumour"),
    "liver_tumor": ("liver_tumor", "liver_tumour", "liver_lesion"),
    "pancreas": ("pancreas",),
}

# Friendly plurals accepted on the command line.
ALIASES: Mapping[str, str] = {
    "kidneys": "kidney",
    "lungs": "lung",
    "kidney_tumour": "kidney_tumor",
    "liver_tumour": "liver_tumor",
}

# Dataset configs: name -> (organ groups in label order, lesion group or None).
# Label ids are 1..K in this order; a later organ overwrites an earlier one where they overlap,
# so a tumour listed after its host organ wins inside the host.
DATASET_CONFIGS: Mapping[str, tuple[tuple[str, ...], str | None]] = {
    "kidneys": (("kidney",), None),
    "liver": (("liver",), None),
    "lungs": (("lung",), None),
    "kidney_tumor": (("kidney", "kidney_tumor"), "kidney_tumor"),
    "liver_tumor": (("liver", "liver_tumor"), "liver_tumor"),
    "abdomen": (("liver", "spleen", "kidney"), None),
}


class UnknownOrganError(ValueError):
  """An organ name that matches no label of the dataset."""


def canonical_name(name: str) -> str:
  name = name.strip().lower()
  return ALIASES.get(name, name)


def source_names(group: str) -> tuple[str, ...]:
  """Source label names covered by an organ group (or the name itself)."""
  group = canonical_name(group)
  return ORGAN_GROUPS.get(group, (group,))


def resolve_label_ids(
    organs: Sequence[str], label_names: Mapping[int, str]
) -> list[list[int]]:
  """Maps each organ group to the source label ids it covers in `label_names` (id -> name).

  Returns one list of ids per organ (possibly empty when this case lacks it). Raises
  UnknownOrganError when a group matches no name in the label vocabulary at all.
  """
  by_name = {str(n).lower(): int(i) for i, n in label_names.items()}
  out = []
  for organ in organs:
    names = source_names(organ)
    ids = [by_name[n] for n in names if n in by_name]
    if not ids:
      raise UnknownOrganError(
          f"unknown organ {organ!r}: none of {list(names)} is a label of this dataset "
          f"(labels: {sorted(by_name)[:20]}{'...' if len(by_name) > 20 else ''})")
    out.append(ids)
  return out


def parse_organ_list(text: str | Iterable[str]) -> tuple[str, ...]:
  """'liver, spleen,kidneys' -> ('liver', 'spleen', 'kidney')."""
  items = text.split(",") if isinstance(text, str) else list(text)
  organs = tuple(canonical_name(s) for s in items if s.strip())
  if not organs:
    raise ValueError("empty organ list")
  return organs
