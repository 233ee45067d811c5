"""What a network's neurons detect: concept annotation with a vision-language model (CLIP-Dissect, MAMMI).

- :mod:`~nemt.concepts.methods`: the two rules on tensors (soft-WPMI; MAMMI's template-adjusted sums);
- :mod:`~nemt.concepts.vlm`: the ``VisionLanguageModel`` protocol, an oracle for tests, adapters for
  open_clip and Hugging Face CLIP folders given by the user (nothing downloads), cached image embeddings;
- :mod:`~nemt.concepts.tiny_clip`: a tiny CLIP trained by nemt on phantoms with generated captions;
- :mod:`~nemt.concepts.annotate`: activations streamed per batch and the per-neuron annotation;
- :mod:`~nemt.concepts.report`: contact sheets and the HTML page.
"""
from nemt.concepts.annotate import (DEFAULT_CONCEPTS, METHODS, ConceptAnnotation, annotate, hit_rate,
                                    layer_activations, neuron_values, read_concepts)
from nemt.concepts.methods import MammiResult, clip_dissect, concept_probabilities, cosine, mammi, soft_wpmi
from nemt.concepts.tiny_clip import DISTRACTORS, TinyCLIP, phantom_captions, train_tiny_clip
from nemt.concepts.vlm import (HFCLIPAdapter, OpenCLIPAdapter, OracleVLM, VisionLanguageModel, image_embeddings,
                               load_vlm)

__all__ = ["DEFAULT_CONCEPTS", "DISTRACTORS", "METHODS", "ConceptAnnotation", "HFCLIPAdapter", "MammiResult",
           "OpenCLIPAdapter", "OracleVLM", "TinyCLIP", "VisionLanguageModel", "annotate", "clip_dissect",
           "concept_probabilities", "cosine", "hit_rate", "image_embeddings", "layer_activations", "load_vlm",
           "mammi", "neuron_values", "phantom_captions", "read_concepts", "soft_wpmi", "train_tiny_clip"]
