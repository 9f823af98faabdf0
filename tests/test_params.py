"""Parameter validation: types, ranges, defaults, seeds, samplers, frontend compatibility."""
import math

import pytest

from dreamlayer.img2img import params as P
from dreamlayer.errors import ApiError

CHOICES = dict(checkpoints=["a.safetensors", "b.safetensors"], samplers=["euler", "euler_ancestral", "dpmpp_2m"],
               schedulers=["normal", "karras", "exponential"])

#: The 37 keys DreamLayer's frontend sends with every img2img request, with its UI defaults.
FRONTEND_DEFAULTS = {
    "prompt": "a cat", "negative_prompt": "", "model_name": "a.safetensors", "sampler_name": "euler",
    "scheduler": "normal", "steps": 20, "cfg_scale": 7.0, "denoising_strength": 0.75, "width": 512,
    "height": 512, "batch_size": 4, "batch_count": 1, "seed": -1, "random_seed": True, "clip_skip": 1,
    "tiling": False, "tile_size": 512, "tile_overlap": 64, "hires_fix": False, "karras_sigmas": False,
    "lora": None, "restore_faces": False, "face_restoration_model": "codeformer", "codeformer_weight": 0.5,
    "gfpgan_weight": 0.5, "hires_fix_enabled": False, "hires_fix_upscale_method": "upscale-by",
    "hires_fix_upscale_factor": 2.5, "hires_fix_hires_steps": 15, "hires_fix_denoising_strength": 0.5,
    "hires_fix_resize_width": 4000, "hires_fix_resize_height": 4000, "hires_fix_upscaler": "4x-ultrasharp",
    "refiner_enabled": False, "refiner_model": "none", "refiner_switch_at": 0.8, "custom_workflow": None,
}


def bad(data) -> ApiError:
    with pytest.raises(ApiError) as info:
        P.parse_params(data)
    assert info.value.status == 400
    return info.value


def test_frontend_request_is_accepted_without_warnings():
    assert len(FRONTEND_DEFAULTS) == 37
    g = P.parse_params(FRONTEND_DEFAULTS)
    assert g.warnings == ()
    assert g.batch_size == 4 and g.random_seed and 1 <= g.seed < 2**31


def test_defaults():
    g = P.parse_params({"prompt": "x", "seed": 3})
    assert (g.denoising_strength, g.steps, g.cfg_scale, g.batch_size, g.batch_count, g.grow_mask_by) == \
        (0.75, 20, 7.0, 1, 1, 6)
    assert g.seed == 3 and not g.random_seed


def test_null_means_not_set():
    g = P.parse_params({"prompt": "x", "steps": None, "cfg_scale": None, "seed": None})
    assert g.steps == 20 and g.cfg_scale == 7.0 and g.random_seed


def test_prompt_is_required():
    e = bad({"steps": 3})
    assert e.code == "missing_parameter" and e.details["field"] == "prompt"


@pytest.mark.parametrize("field,value", [
    ("steps", 0), ("steps", 151), ("steps", -5), ("steps", 2.5), ("steps", "20"), ("steps", True),
    ("cfg_scale", 0.5), ("cfg_scale", 21), ("cfg_scale", math.nan), ("cfg_scale", math.inf),
    ("denoising_strength", 1.01), ("denoising_strength", -0.1), ("batch_size", 9), ("batch_count", 0),
    ("width", 32), ("height", 4096), ("grow_mask_by", 65), ("seed", 2**64), ("seed", "abc"), ("seed", 1.5),
    ("prompt", 5), ("prompt", "x" * 1_000_000), ("negative_prompt", ["a"]), ("random_seed", "yes"),
    ("clip_skip", 13),
])
def test_wrong_type_or_range_names_the_field(field, value):
    data = {"prompt": "x", field: value}
    e = bad(data)
    assert e.details["field"] == field
    assert field in e.message


def test_range_error_states_the_range():
    e = bad({"prompt": "x", "steps": 500})
    assert "1" in e.message and "150" in e.message and e.details["maximum"] == 150


def test_random_seed_and_nonpositive_seeds_are_random():
    seeds = {P.parse_params({"prompt": "x", "seed": 0}).seed for _ in range(5)}
    assert len(seeds) > 1 and all(s > 0 for s in seeds)
    assert P.parse_params({"prompt": "x", "seed": 42, "random_seed": True}).random_seed


def test_batch_count_seeds_increment():
    g = P.parse_params({"prompt": "x", "seed": 10, "batch_count": 3})
    assert g.seeds() == [10, 11, 12]


def test_batch_count_seeds_wrap_past_the_maximum_to_1_so_each_can_be_sent_again():
    """Found on a real ComfyUI: the maximum seed and batch_count 2 answered [2**64 - 1, 0], and a
    request with seed 0 gets a random seed, not the second image again."""
    top = 2**64 - 1
    g = P.parse_params({"prompt": "x", "seed": top - 1, "batch_count": 4})
    assert g.seeds() == [top - 1, top, 1, 2]
    for seed in g.seeds():
        again = P.parse_params({"prompt": "x", "seed": seed})
        assert again.seeds() == [seed] and not again.random_seed


def test_unknown_keys_warn_and_advanced_settings_are_read():
    g = P.parse_params({"prompt": "x", "seed": 1, "hires_fix": True, "restore_faces": True, "stepz": 3,
                        "tiling": False, "lora": {"enabled": False}})
    assert g.warnings == ("Unknown parameter 'stepz' was ignored",)
    assert g.advanced.hires.factor == 2.5 and g.advanced.hires.upscaler == "4x-ultrasharp"
    assert g.advanced.face_restore.model == "codeformer" and g.advanced.tiling is None


def test_the_frontends_defaults_turn_every_advanced_setting_off():
    g = P.parse_params(FRONTEND_DEFAULTS)
    assert g.warnings == () and g.advanced == P.Advanced()


def test_params_must_be_an_object():
    e = bad(["prompt"])
    assert e.code == "invalid_params"


@pytest.mark.parametrize("label,expected", [
    ("euler", ("euler", "normal")),
    ("Euler a", ("euler_ancestral", "normal")),
    ("euler-a", ("euler_ancestral", "normal")),
    ("DPM++ 2M Karras", ("dpmpp_2m", "karras")),
    ("dpm-2m-karras", ("dpmpp_2m", "karras")),
    ("DPM++ 2M Exponential", ("dpmpp_2m", "exponential")),
])
def test_sampler_names(label, expected):
    g = P.resolve_choices(P.parse_params({"prompt": "x", "sampler_name": label, "seed": 1}), **CHOICES)
    assert (g.sampler_name, g.scheduler) == expected


@pytest.mark.parametrize("label,expected", [
    ("karras", "karras"), ("Karras", "karras"), ("SGM Uniform", "sgm_uniform"), ("sgm-uniform", "sgm_uniform"),
    ("Exponential", "exponential"), ("Uniform", "normal"), ("DDIM", "ddim_uniform"), ("Automatic", "normal"),
    ("Normal", "normal"),
])
def test_scheduler_names_and_a1111_schedule_types(label, expected):
    comfy = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta", "linear_quadratic",
             "kl_optimal"]  # ComfyUI 0.3.40's
    g = P.resolve_choices(P.parse_params({"prompt": "x", "scheduler": label, "seed": 1}),
                          **{**CHOICES, "schedulers": comfy})
    assert g.scheduler == expected


def test_karras_sigmas_sets_scheduler():
    g = P.resolve_choices(P.parse_params({"prompt": "x", "karras_sigmas": True, "seed": 1}), **CHOICES)
    assert g.scheduler == "karras"


@pytest.mark.parametrize("field,value,code", [
    ("model_name", "nope.safetensors", "unknown_model"),
    ("sampler_name", "PLMS", "unknown_sampler"),
    ("scheduler", "weird", "unknown_scheduler"),
])
def test_unknown_choices_list_valid_values(field, value, code):
    g = P.parse_params({"prompt": "x", field: value, "seed": 1})
    with pytest.raises(ApiError) as info:
        P.resolve_choices(g, **CHOICES)
    e = info.value
    assert (e.status, e.code, e.details["field"]) == (400, code, field)
    assert e.details["allowed"] and all(v in e.message for v in e.details["allowed"])


def test_default_model():
    g = P.parse_params({"prompt": "x", "seed": 1})
    assert P.resolve_choices(g, **CHOICES).model_name == "a.safetensors"
    assert P.resolve_choices(g, default_model="b.safetensors", **CHOICES).model_name == "b.safetensors"


@pytest.mark.parametrize("key, limit, make", [
    ("lora", P.MAX_LORAS, lambda n: [{"lora_name": f"l{i}.safetensors"} for i in range(n)]),
    ("controlnet", P.MAX_CONTROLNET_UNITS, lambda n: {"units": [{"model": f"c{i}.safetensors"} for i in range(n)]}),
])
def test_lora_and_controlnet_lists_are_bounded(key, limit, make):
    """docs/api.md: at most 16 LoRAs and 10 ControlNet units (the page offers 10)."""
    params = P.parse_params({"prompt": "x", key: make(limit)})
    assert len(params.loras if key == "lora" else params.controlnet_units) == limit
    with pytest.raises(ApiError) as err:
        P.parse_params({"prompt": "x", key: make(limit + 1)})
    assert err.value.status == 400 and err.value.details["maximum"] == limit
