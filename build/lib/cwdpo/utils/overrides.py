"""The `+group=` spelling of Hydra overrides, shared by `cwdpo.train` (its command line) and
the report (run settings recorded before and after the groups joined the defaults list)."""

from __future__ import annotations

# Groups that conf/train.yaml lists as `<group>: null` (as the lightning-hydra-template does),
# so `experiment=NAME` picks one. Hydra 1.3 refuses `+experiment=NAME` for a group already in
# the defaults list ("Multiple values for experiment"), but that is the documented command
# (and the spelling of every earlier run's overrides): `plain_group_overrides` accepts it.
NULL_DEFAULT_GROUPS = ("experiment", "hparams_search", "debug")


def plain_group_overrides(overrides: list[str]) -> list[str]:
    """`+experiment=NAME` → `experiment=NAME` (likewise `+debug=`, `+hparams_search=`); every
    other override as it is. For `cwdpo.train`'s command line and for `compose` callers."""
    out = []
    for o in overrides:
        key = o[1:].split("=", 1)[0] if o.startswith("+") and not o.startswith("++") else None
        out.append(o[1:] if key in NULL_DEFAULT_GROUPS and "=" in o else o)
    return out
