"""The public surface: pinned top-level names, Influenciae's names, documentation."""

from __future__ import annotations

import inspect

import vestigia

PUBLIC = [
    "ArnoldiInfluenceCalculator",
    "BaseInfluenceCalculator",
    "BaseInfluenceModel",
    "CACHE",
    "ConjugateGradientDescentIHVP",
    "DataInf",
    "EKFACIHVP",
    "ExactIHVP",
    "FirstOrderInfluenceCalculator",
    "GradCos",
    "GradDot",
    "IHVPCalculator",
    "InfluenceModel",
    "InvalidDataError",
    "InvalidModelError",
    "InverseHessianVectorProduct",
    "KFACIHVP",
    "LissaIHVP",
    "LoGra",
    "NonFiniteError",
    "ORDER",
    "RepresenterPointL2",
    "RepresenterPointLJE",
    "SampleBoundaryCalculator",
    "SecondOrderInfluenceCalculator",
    "SelfInfluenceCalculator",
    "TRAK",
    "TopK",
    "TracIn",
    "WeightsBoundaryCalculator",
    "default_process_batch",
    "plot_datacentric_explanations",
    "plot_most_influential_images",
]

# Every public name the Influenciae 0.3.0 README and method table use.
SEED_NAMES = [
    "InfluenceModel",
    "ExactIHVP",
    "ConjugateGradientDescentIHVP",
    "LissaIHVP",
    "FirstOrderInfluenceCalculator",
    "SecondOrderInfluenceCalculator",
    "ArnoldiInfluenceCalculator",
    "TracIn",
    "RepresenterPointL2",
    "RepresenterPointLJE",
    "SampleBoundaryCalculator",
    "WeightsBoundaryCalculator",
    "ORDER",
    "CACHE",
    "plot_most_influential_images",
    "plot_datacentric_explanations",
]


def test_top_level_names_are_pinned_and_sorted() -> None:
    assert vestigia.__all__ == PUBLIC
    assert PUBLIC == sorted(PUBLIC)
    missing = [name for name in PUBLIC if not hasattr(vestigia, name)]
    assert missing == []


def test_every_seed_name_is_importable_from_the_top_level() -> None:
    assert [name for name in SEED_NAMES if name not in vestigia.__all__] == []


def test_public_classes_and_functions_are_documented() -> None:
    undocumented = [name for name in PUBLIC if not inspect.getdoc(getattr(vestigia, name))]
    assert undocumented == []


def test_calculators_offer_the_seed_interface() -> None:
    inner_product = [
        vestigia.FirstOrderInfluenceCalculator,
        vestigia.ArnoldiInfluenceCalculator,
        vestigia.TracIn,
        vestigia.RepresenterPointL2,
        vestigia.RepresenterPointLJE,
    ]
    for cls in inner_product:
        for method in (
            "compute_influence_values",
            "compute_top_k_from_training_dataset",
            "compute_influence_vector",
            "estimate_influence_values_in_batches",
            "top_k",
        ):
            assert callable(getattr(cls, method, None)), f"{cls.__name__}.{method}"
    for cls in (vestigia.SampleBoundaryCalculator, vestigia.WeightsBoundaryCalculator):
        assert callable(cls.compute_influence_values) and callable(cls.compute_top_k_from_training_dataset)
    for cls in (vestigia.FirstOrderInfluenceCalculator, vestigia.SecondOrderInfluenceCalculator):
        assert callable(cls.estimate_influence_values_group) and callable(cls.compute_influence_vector_group)
