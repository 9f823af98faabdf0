"""Random prompts for the page's "Add Random" buttons (GET /api/fetch-prompt?type=positive|negative).

The lists are this project's own. A positive prompt is a subject, a medium, a light and a detail;
a negative prompt is a handful of the usual defects to steer away from.
"""
from __future__ import annotations

import random

from dreamlayer.errors import InvalidParameter

PROMPT_TYPES = ("positive", "negative")

SUBJECTS = (
    "a lighthouse on a basalt cliff above a grey sea",
    "an old tram crossing a rainy cobbled square",
    "a red fox curled up asleep in fresh snow",
    "a glasshouse crowded with orchids and ferns",
    "a camel caravan crossing dunes at dusk",
    "a paper boat drifting across a puddle",
    "a clockmaker's workbench covered in tiny gears",
    "a koi pond under a maple tree in autumn",
    "a wooden mountain hut above a sea of clouds",
    "a night market strung with paper lanterns",
    "an astronaut watering tomatoes in a greenhouse on the moon",
    "a dragon asleep around the top of a ruined tower",
    "a bicycle leaning against a faded blue door",
    "a cup of tea steaming beside an open sketchbook",
    "a heron standing still in the morning mist",
    "a spiral staircase winding through a tall library",
    "a snail climbing the side of a green glass bottle",
    "a fishing village of stilt houses at low tide",
    "a cat sitting on a windowsill full of cacti",
    "a submarine window looking out at a jellyfish swarm",
    "a robot repairing a violin in a quiet workshop",
    "a field of sunflowers under a towering thunderstorm",
    "an abandoned train station overgrown with ivy",
    "a hot air balloon over terraced rice fields",
)

MEDIA = (
    "watercolor illustration",
    "35mm film photograph",
    "oil painting with thick brush strokes",
    "isometric 3D render",
    "ink drawing with a light color wash",
    "soft pastel sketch",
    "cinematic film still",
    "linocut print in three colors",
    "macro photograph",
    "children's book illustration",
    "matte painting",
    "gouache painting",
)

LIGHTS = (
    "golden hour light",
    "soft overcast light",
    "neon reflections on wet ground",
    "warm candlelight",
    "cool blue hour light",
    "dappled sunlight through leaves",
    "dramatic rim lighting",
    "moonlight and long shadows",
)

DETAILS = (
    "highly detailed",
    "shallow depth of field",
    "muted earthy palette",
    "vivid saturated colors",
    "wide angle view",
    "symmetrical composition",
    "fine textures",
    "calm and quiet mood",
)

NEGATIVE_TERMS = (
    "blurry",
    "out of focus",
    "low resolution",
    "jpeg artifacts",
    "overexposed",
    "underexposed",
    "washed-out colors",
    "oversaturated",
    "watermark",
    "text",
    "signature",
    "logo",
    "cropped",
    "frame",
    "duplicated objects",
    "extra fingers",
    "malformed hands",
    "distorted face",
    "bad anatomy",
    "noise",
    "banding",
    "flat lighting",
)


def random_prompt(kind: str | None, rng: random.Random | None = None) -> str:
    """One random prompt of ``kind`` ("positive" or "negative")."""
    rng = rng or random
    if kind == "positive":
        return ", ".join((rng.choice(SUBJECTS), rng.choice(MEDIA), rng.choice(LIGHTS), rng.choice(DETAILS)))
    if kind == "negative":
        return ", ".join(rng.sample(NEGATIVE_TERMS, rng.randint(5, 8)))
    got = "nothing" if kind is None else repr(str(kind)[:40])
    raise InvalidParameter("type", f"'type' must be one of {', '.join(PROMPT_TYPES)} (got {got})",
                           allowed=list(PROMPT_TYPES))
