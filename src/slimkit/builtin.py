"""Makes the built-in techniques, tasks and model classes known.

Importing a technique module runs its ``@register`` decorators (stage configs and handlers)
and its ``@compressed_module`` decorators (layer classes an artifact may name); importing the
tasks registers their model classes as constructible. ``slimkit.api`` imports this module,
so ``import slimkit`` makes all of them known; nothing below the top floor imports it.
"""

# ruff: noqa: F401
import slimkit.distill.stage
import slimkit.encode.stage
import slimkit.factorize.stage
import slimkit.formats.bf16
import slimkit.formats.nf4
import slimkit.formats.sparse
import slimkit.nas.stage
import slimkit.prune.magnitude
import slimkit.prune.nm
import slimkit.prune.schedule
import slimkit.prune.sparsegpt
import slimkit.prune.structured
import slimkit.prune.transformer
import slimkit.prune.unstructured
import slimkit.quant.awq
import slimkit.quant.bf16
import slimkit.quant.gptq
import slimkit.quant.kmeans
import slimkit.quant.mixed
import slimkit.quant.qat
import slimkit.quant.rtn
import slimkit.quant.static
import slimkit.quant.w8a8
import slimkit.separable.stage
import slimkit.tasks
import slimkit.tasks.searched
import slimkit.train.finetune
