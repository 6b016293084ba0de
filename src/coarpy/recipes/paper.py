"""The paper's four setups as data: what each ablates, how often, over which examples.

:data:`SETUPS` maps a setup's name to a :class:`PaperSetup` holding the numbers of the
paper (Shah, Ilyas, Madry 2024) and of its reference scripts' store specifications:
the factory that builds the setup, its component count, the ablation fraction α, the
number of masks, the examples and the output function, and the average held-out
Pearson correlation the paper reports for COAR and its baselines.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PaperSetup:
    """One of the paper's setups.

    Attributes
    ----------
    name : the setup's name in :data:`SETUPS`.
    factory : the run-configuration factory, ``"coarpy.recipes:<function>"``.
    model : the architecture and its weights, in words.
    components : the number of components of the paper's component set.
    alpha : the ablation fraction (each component ablated with probability α).
    n_masks : the number of masks of the paper's component dataset.
    examples : the examples whose outputs are stored, in words.
    n_examples : their number.
    output : the output function (a ``coarpy.outputs`` name or ``"module:function"``).
    reported : the average held-out Pearson correlation at α the paper reports, per
        method (empty where the paper gives none).
    """

    name: str
    factory: str
    model: str
    components: int
    alpha: float
    n_masks: int
    examples: str
    n_examples: int
    output: str
    reported: dict[str, float] = field(default_factory=dict)


SETUPS: dict[str, PaperSetup] = {
    s.name: s
    for s in (
        PaperSetup(
            name="cifar10_resnet",
            factory="coarpy.recipes:cifar10_resnet",
            model="MiniResNet (9 convs x 256 filters), trained on CIFAR-10",
            components=2_304,
            alpha=0.05,
            n_masks=50_000,
            examples="the CIFAR-10 test set",
            n_examples=10_000,
            output="margin",
            reported={"coar": 0.75, "leave_one_out": 0.52, "gradient": 0.24},
        ),
        PaperSetup(
            name="imagenet_resnet50",
            factory="coarpy.recipes:imagenet_resnet50",
            model="torchvision ResNet-50, IMAGENET1K_V1 weights",
            components=22_720,
            alpha=0.05,
            n_masks=100_000,
            examples="the ImageNet validation set",
            n_examples=50_000,
            output="coarpy.recipes.imagenet:imagenet_margin",
            reported={"coar": 0.65, "leave_one_out": 0.34, "gradient": 0.17},
        ),
        PaperSetup(
            name="imagenet_vit_b16",
            factory="coarpy.recipes:imagenet_vit_b16",
            model="torchvision ViT-B/16, IMAGENET1K_V1 weights",
            components=82_944,
            alpha=0.05,
            n_masks=5_000,
            examples="every 10th ImageNet validation image",
            n_examples=5_000,
            output="coarpy.recipes.imagenet:imagenet_margin",
            reported={"coar": 0.76, "leave_one_out": 0.65, "gradient": 0.54},
        ),
        PaperSetup(
            name="tinystories_gpt2",
            factory="coarpy.recipes:tinystories_gpt2",
            model="GPT-2 small (Hugging Face 'gpt2')",
            components=64_512,
            alpha=0.025,
            n_masks=100_000,
            examples="the last 500 TinyStories validation stories, at most 1,024 tokens",
            n_examples=500,
            output="token_margin",
        ),
    )
}


def settings(name: str) -> dict[str, float | int | str]:
    """The run settings a factory returns next to its model: α, masks, output, setup."""
    s = SETUPS[name]
    return {"alpha": s.alpha, "n_masks": s.n_masks, "setup": s.name}
