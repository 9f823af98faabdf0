"""ComfyUI 0.3.40's prompt validation (execution.validate_prompt / validate_inputs), re-implemented.

The error bodies a client sees come from here, so the rules, texts and even the accidents are
kept: only nodes reachable from output nodes are checked; a link to a missing node surfaces as
a KeyError caught one level up ("exception_during_inner_validation", attributed to the linked
node with the *linking* input's name); inputs checked by VALIDATE_INPUTS skip min/max/enum checks;
values are converted in place (so the queued prompt holds ints/floats); a node's errors are
reported for every failing output validated so far.
"""
from __future__ import annotations

import inspect
import logging
import sys
import traceback

from . import catalog
from .nodes import NODE_CLASSES

log = logging.getLogger(__name__)


def full_type_name(klass) -> str:
    module = klass.__module__
    if module == "builtins":
        return klass.__qualname__
    return module + "." + klass.__qualname__


def is_link(value) -> bool:
    """comfy_execution.graph_utils.is_link."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], (int, float)))


def type_matches(received_type, input_type) -> bool:
    """comfy_execution.validation.validate_node_input (non-strict): any comma-separated overlap."""
    if not received_type != input_type:
        return True
    if not isinstance(received_type, str) or not isinstance(input_type, str):
        return False
    received = {t.strip() for t in received_type.split(",")}
    wanted = {t.strip() for t in input_type.split(",")}
    return len(received & wanted) > 0


def _validate_function_args(class_type: str) -> list[str]:
    """Names VALIDATE_INPUTS takes (besides cls and the folders the fake passes first)."""
    cls = NODE_CLASSES.get(class_type)
    fn = getattr(cls, "VALIDATE_INPUTS", None)
    if fn is None:
        return []
    return inspect.getfullargspec(fn).args[2:]


class Validator:
    """Validates prompts against a live object_info and the fake's folders."""

    def __init__(self, object_info: dict, folders):
        self.object_info = object_info
        self.folders = folders

    # One node, recursing into linked nodes (memoised in `validated`).
    def validate_inputs(self, prompt: dict, unique_id, validated: dict):
        if unique_id in validated:
            return validated[unique_id]

        inputs = prompt[unique_id]["inputs"]
        class_type = prompt[unique_id]["class_type"]
        class_info = self.object_info[class_type]
        declared = class_info.get("input", {})
        names = list(declared.get("required", {}) or {}) + [
            n for n in (declared.get("optional", {}) or {}) if n not in (declared.get("required") or {})]

        errors = []
        valid = True
        custom_args = _validate_function_args(class_type)

        for x in names:
            input_type, category, extra_info = catalog.input_info(class_info, x)
            if x not in inputs:
                if category == "required":
                    errors.append({"type": "required_input_missing", "message": "Required input is missing",
                                   "details": f"{x}", "extra_info": {"input_name": x}})
                continue

            val = inputs[x]
            info = [input_type, extra_info]
            if isinstance(val, list):
                if len(val) != 2:
                    errors.append({"type": "bad_linked_input",
                                   "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                                   "details": f"{x}",
                                   "extra_info": {"input_name": x, "input_config": info, "received_value": val}})
                    continue
                o_id = val[0]
                o_class_type = prompt[o_id]["class_type"]
                received_type = catalog.return_types(self.object_info[o_class_type])[val[1]]
                if not type_matches(received_type, input_type):
                    errors.append({
                        "type": "return_type_mismatch", "message": "Return type mismatch between linked nodes",
                        "details": f"{x}, received_type({received_type}) mismatch input_type({input_type})",
                        "extra_info": {"input_name": x, "input_config": info, "received_type": received_type,
                                       "linked_node": val}})
                    continue
                try:
                    r = self.validate_inputs(prompt, o_id, validated)
                    if r[0] is False:
                        valid = False
                        continue
                except Exception as ex:
                    typ, _, tb = sys.exc_info()
                    valid = False
                    validated[o_id] = (False, [{
                        "type": "exception_during_inner_validation",
                        "message": "Exception when validating inner node",
                        "details": str(ex),
                        "extra_info": {"input_name": x, "input_config": info, "exception_message": str(ex),
                                       "exception_type": full_type_name(typ),
                                       "traceback": traceback.format_tb(tb), "linked_node": val}}], o_id)
                    continue
            else:
                try:
                    if isinstance(val, dict) and "__value__" in val:
                        val = val["__value__"]
                        inputs[x] = val
                    if input_type == "INT":
                        val = int(val)
                        inputs[x] = val
                    if input_type == "FLOAT":
                        val = float(val)
                        inputs[x] = val
                    if input_type == "STRING":
                        val = str(val)
                        inputs[x] = val
                    if input_type == "BOOLEAN":
                        val = bool(val)
                        inputs[x] = val
                except Exception as ex:
                    errors.append({
                        "type": "invalid_input_type",
                        "message": f"Failed to convert an input value to a {input_type} value",
                        "details": f"{x}, {val}, {ex}",
                        "extra_info": {"input_name": x, "input_config": info, "received_value": val,
                                       "exception_message": str(ex)}})
                    continue

                if x not in custom_args:
                    if "min" in extra_info and val < extra_info["min"]:
                        errors.append({
                            "type": "value_smaller_than_min",
                            "message": "Value {} smaller than min of {}".format(val, extra_info["min"]),
                            "details": f"{x}",
                            "extra_info": {"input_name": x, "input_config": info, "received_value": val}})
                        continue
                    if "max" in extra_info and val > extra_info["max"]:
                        errors.append({
                            "type": "value_bigger_than_max",
                            "message": "Value {} bigger than max of {}".format(val, extra_info["max"]),
                            "details": f"{x}",
                            "extra_info": {"input_name": x, "input_config": info, "received_value": val}})
                        continue
                    if isinstance(input_type, list):
                        options = input_type
                        if val not in options:
                            input_config = info
                            if len(options) > 20:  # ComfyUI does not echo long (model) lists
                                list_info = f"(list of length {len(options)})"
                                input_config = None
                            else:
                                list_info = str(options)
                            errors.append({
                                "type": "value_not_in_list", "message": "Value not in list",
                                "details": f"{x}: '{val}' not in {list_info}",
                                "extra_info": {"input_name": x, "input_config": input_config,
                                               "received_value": val}})
                            continue

        if custom_args:
            errors.extend(self._custom_validation(class_type, class_info, inputs, custom_args))

        ret = (False, errors, unique_id) if (errors or valid is not True) else (True, [], unique_id)
        validated[unique_id] = ret
        return ret

    def _custom_validation(self, class_type, class_info, inputs, custom_args):
        """VALIDATE_INPUTS over the constant inputs it names (links arrive as None)."""
        filtered = {}
        for x, val in inputs.items():
            _, category, _ = catalog.input_info(class_info, x)
            if x not in custom_args:
                continue
            if is_link(val):
                filtered[x] = None
            elif category is not None:
                filtered[x] = val
        ret = NODE_CLASSES[class_type].VALIDATE_INPUTS(self.folders, **filtered)
        errors = []
        for x in filtered:
            if ret is not True:
                details = f"{x}"
                if ret is not False:
                    details += f" - {str(ret)}"
                errors.append({"type": "custom_validation_failed", "message": "Custom validation failed for node",
                               "details": details, "extra_info": {"input_name": x}})
        return errors

    def validate_prompt(self, prompt: dict):
        """(ok, error, good_outputs, node_errors) exactly as ComfyUI returns them."""
        outputs = []
        for x in prompt:
            if "class_type" not in prompt[x]:
                return (False, {"type": "invalid_prompt",
                                "message": "Cannot execute because a node is missing the class_type property.",
                                "details": f"Node ID '#{x}'", "extra_info": {}}, [], {})
            class_type = prompt[x]["class_type"]
            info = self.object_info.get(class_type)  # unhashable class_type -> TypeError -> 500, as real
            if info is None:
                return (False, {"type": "invalid_prompt",
                                "message": f"Cannot execute because node {class_type} does not exist.",
                                "details": f"Node ID '#{x}'", "extra_info": {}}, [], {})
            if catalog.is_output_node(info) and x not in outputs:
                outputs.append(x)

        if not outputs:
            return (False, {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "",
                            "extra_info": {}}, [], {})

        good_outputs = []
        failed = []
        node_errors: dict = {}
        validated: dict = {}
        for o in outputs:
            try:
                valid, reasons, _ = self.validate_inputs(prompt, o, validated)
            except Exception as ex:
                typ, _, tb = sys.exc_info()
                valid = False
                reasons = [{"type": "exception_during_validation", "message": "Exception when validating node",
                            "details": str(ex),
                            "extra_info": {"exception_type": full_type_name(typ),
                                           "traceback": traceback.format_tb(tb)}}]
                validated[o] = (False, reasons, o)

            if valid is True:
                good_outputs.append(o)
                continue
            log.info("fake ComfyUI: prompt output %s failed validation", o)
            failed.append((o, reasons))
            for node_id, result in validated.items():
                if result[0] is not True and len(result[1]) > 0:
                    if node_id not in node_errors:
                        node_errors[node_id] = {"errors": result[1], "dependent_outputs": [],
                                                "class_type": prompt[node_id]["class_type"]}
                    node_errors[node_id]["dependent_outputs"].append(o)

        if not good_outputs:
            lines = [f"{e['message']}: {e['details']}" for _, errs in failed for e in errs]
            return (False, {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                            "details": "\n".join(lines), "extra_info": {}}, [], node_errors)
        return (True, None, good_outputs, node_errors)
