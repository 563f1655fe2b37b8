"""Semantic-trigram analyses of routing traces: specialisation against a null model, domains, enrichment, usage."""

from lazarus_core.trigram.domains import DomainTest, chi_square, domain_test
from lazarus_core.trigram.enrichment import ExpertEnrichment, expert_enrichment
from lazarus_core.trigram.labels import TokenLabels, label_tokens, label_trace, trigram_ids
from lazarus_core.trigram.specialisation import (ExpertSpecialisation, LayerSpecialisation, SpecialisationReport,
                                                 trigram_specialisation)
from lazarus_core.trigram.usage import LayerUsage, LayerWeights, coactivation_matrix, layer_usage, layer_weights

__all__ = ["DomainTest", "chi_square", "domain_test", "ExpertEnrichment", "expert_enrichment", "TokenLabels",
           "label_tokens", "label_trace", "trigram_ids", "ExpertSpecialisation", "LayerSpecialisation",
           "SpecialisationReport", "trigram_specialisation", "LayerUsage", "LayerWeights", "coactivation_matrix",
           "layer_usage", "layer_weights"]
