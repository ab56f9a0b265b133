"""Tokens and prompt wording: the one place they live (SPEC §3)."""
from __future__ import annotations

import re

from skinaug import config

# One learned token per condition, in the dataset's own label wording.
TOKENS = {
    "basal cell carcinoma": "<bas-class>",
    "folliculitis": "<fol-class>",
    "nematode infection": "<nem-class>",
    "neutrophilic dermatoses": "<neu-class>",
    "prurigo nodularis": "<pru-class>",
    "psoriasis": "<pso-class>",
    "squamous cell carcinoma": "<squ-class>",
}

# Skin-type wording of the LoRA and generation prompts, by fitzpatrick_scale.
# Types 3 and 4 are not in the study; they are worded for the demo world's web corpus.
TONES = {
    1: "a very light-skinned",
    2: "a light-skinned",
    3: "a lightly tanned",
    4: "a brown-skinned",
    5: "a dark-skinned",
    6: "a very dark-skinned",
}

# The one sentence naming a condition on a skin type: what the LoRA trains on, generation prompts
# with (skin_prompt), and the demo world's web corpus is captioned with (skin_text), so that the
# tiny demo base has seen the sentence it is later prompted with.
SKIN_TEMPLATE = "An image of {condition} on the skin of {tone} individual"

# Textual-inversion templates, by textual_inversion.templates. "authors": the 11 neutral templates
# the authors train with (`skin_disease_prompt` in their textual_inversion.py); "imagenet": the
# diffusers example's imagenet_templates_small, whose "a dark photo of the {}" and "a bright photo
# of the {}" speak of brightness, which a skin-tone study must not teach its tokens.
TI_TEMPLATES = {
    "authors": [
        "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
        "a close-up photo of a {}", "a cropped photo of a {}", "a photo of the {}", "a photo of one {}",
        "a close-up photo of the {}", "a rendition of the {}", "a rendition of a {}",
    ],
    "imagenet": [
        "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
        "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
        "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
        "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
        "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
        "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
        "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
    ],
}
assert set(TI_TEMPLATES) == set(config.TI_TEMPLATES), "config.TI_TEMPLATES names the allowed template sets"


def token(label: str) -> str:
    return TOKENS[label]


def condition_text(label: str, use_tokens: bool) -> str:
    """The learned token, or the plain condition name (ablation / LoRA without TI)."""
    return TOKENS[label] if use_tokens else label


def skin_prompt(label: str, fitzpatrick_scale: int, use_tokens: bool = True) -> str:
    """'An image of <pso-class> on the skin of a dark-skinned individual'."""
    return skin_text(condition_text(label, use_tokens), fitzpatrick_scale)


def skin_text(condition: str, fitzpatrick_scale: int) -> str:
    """SKIN_TEMPLATE for any condition wording (a token, a label, a web caption's "a mole")."""
    return SKIN_TEMPLATE.format(condition=condition, tone=TONES[int(fitzpatrick_scale)])


def ti_prompt(label: str, template_index: int, templates: str = "authors") -> str:
    chosen = TI_TEMPLATES[templates]
    return chosen[template_index % len(chosen)].format(TOKENS[label])


def vocabulary_words() -> set[str]:
    """Every word our prompts use (the tiny demo tokenizer gives each its own token)."""
    texts = [SKIN_TEMPLATE, *(t for ts in TI_TEMPLATES.values() for t in ts), *TOKENS, *TONES.values(), "skin"]
    words = set()
    for text in texts:
        text = text.lower().replace("{}", " ").replace("{condition}", " ").replace("{tone}", " ")
        words.update(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text))  # CLIP's pre-tokenizer split
    return words
