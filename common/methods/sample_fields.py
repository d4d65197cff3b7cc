"""SampleFields: declared per-row fields from the data module's sample records.

The data module owns ``samples`` (its records: prompt, answer, and tags such as a prompt's index or its task
source). Components in ``common`` never read string keys there; they read declared ``RolloutBatch`` fields. This
method part is the one bridge: after the rollout it copies the named entries of every row's sample into fields,
and says so in ``provides`` (checked at start-up against what the estimator or selector ``requires``).

    SPO single-stream:  fields: {prompt_uid: uid}                 (text_reasoning.spo.PrioritisedData tags "uid")
    DUMP:               fields: {distribution: distribution}      (text_reasoning.curriculum.CurriculumData)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from common.batch import ALWAYS, FIELDS, RolloutBatch
from common.methods.base import Method

if TYPE_CHECKING:
    from common.loop import Loop


class SampleFields(Method):
    """Copy ``sample[key]`` of every row into ``RolloutBatch.<field>`` as a (B,) tensor (ints -> long, floats ->
    float), right after the rollout.

    Args:
        fields: ``{field: sample key}``, e.g. ``{"prompt_uid": "uid"}``; each field a declared RolloutBatch field.
    """

    def __init__(self, fields: Mapping[str, str]):
        super().__init__()
        fields = dict(fields)
        bad = [f for f in fields if f not in FIELDS or f in ALWAYS]
        if not fields or bad:
            raise ValueError(f"SampleFields: fields must map declared optional RolloutBatch fields to sample keys, got "
                             f"{fields} ({bad} are not such fields)")
        self.fields = fields
        self.provides = tuple(fields)  # per instance: the fields this part fills

    def after_rollout(self, loop: "Loop", batch: RolloutBatch) -> RolloutBatch:
        values = {}
        for field, key in self.fields.items():
            try:
                column = [s[key] for s in batch.samples]
            except (KeyError, TypeError) as e:
                raise ValueError(f"SampleFields: RolloutBatch.{field} is copied from samples[i][{key!r}], which the data "
                                 "module's records do not carry (e.g. text_reasoning.spo.PrioritisedData tags 'uid', "
                                 "text_reasoning.curriculum.CurriculumData tags 'distribution')") from e
            if len(column) != batch.batch_size:
                raise ValueError(f"SampleFields: {len(column)} sample records for {batch.batch_size} rows")
            values[field] = torch.tensor(column, device=batch.completion_ids.device)  # (B,)
        return batch.replace(**values)
