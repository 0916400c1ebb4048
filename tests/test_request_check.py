"""check_request, the answer Accengage would give, without HTTP: details, order, macros."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.accengage import api
from engine.accengage.request_check import CODE_ORDER, DEFAULT_DEVICES, check_request, message_count
from tests.helpers import examples
from tests.test_sandbox import (
    BASE,
    DELETE,
    EXAMPLE_ONE_APP,
    EXAMPLE_SEVERAL_APPS,
    example_with_buttons,
    several_apps,
    varied,
)


def detail(body: Any, **options: Any) -> tuple[int, str]:
    """The code and the detail after the API's label."""
    code, label = check_request(body, **options)
    prefix = f"{api.RETURN_CODES[code]}: "
    return code, label.removeprefix(prefix) if code else ""


def buttons(*items: dict[str, Any], template: str | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"buttons": list(items)}
    if template is not None:
        block["template"] = template
    return varied(message__interactiveButtons=block)


def test_examples_and_base_are_sent() -> None:
    for body in (
        BASE,
        json.loads(EXAMPLE_ONE_APP),
        json.loads(EXAMPLE_SEVERAL_APPS),
        example_with_buttons(),
    ):
        assert check_request(body) == (0, "Instant Message has been sent")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ([], (2, "the body must be a JSON object {sendInstantMessage: {...}}")),
        ({"sendInstantMessage": []}, (2, "sendInstantMessage is not an object")),
        (varied(user=DELETE), (3, "user is missing {login, password}")),
        (varied(user__login=5), (3, "user.login must be a non-empty string")),
        (varied(partner__id=""), (4, "partner.id must be a non-empty string")),
        (varied(parentMessageId=1), (10, "parentMessageId must be a non-empty string")),
        (
            varied(parentMessageId=DELETE),
            (10, "the request has neither parentMessageId nor parentMessageExternalId"),
        ),
        (varied(parentMessageId=DELETE, parentMessageExternalId="ext-1"), (0, "")),
        (varied(message=DELETE), (5, "message is missing")),
        (varied(message__badge=3), (5, "message.badge must be a string")),
        (varied(message__popup=True), (0, "")),
        (varied(message__popup={"okButtonLabel": "OK"}), (0, "")),
        (
            varied(message__popup="yes"),
            (5, "message.popup must be a boolean or {okButtonLabel, cancelButtonLabel}"),
        ),
        (
            varied(message__popup={"okLabel": "OK"}),
            (13, "message.popup.okLabel is unknown (did you mean okButtonLabel?)"),
        ),
        (
            varied(message__contentAvailable="true"),
            (5, "message.contentAvailable must be a boolean"),
        ),
        (varied(message__data={"n": 1}), (5, "message.data.n must be a string")),
        (varied(message__aps={"badge": True}), (5, "message.aps.badge must be an integer")),
        (varied(message__aps={"alert": 1}), (5, "message.aps.alert must be a string or an object")),
        (
            varied(message__aps={"alert": {"body": True}}),
            (5, "message.aps.alert.body must be a string or a list of strings"),
        ),
        (
            varied(targets__0__aps={"alert": {"loc-args": ["a", 1]}}),
            (9, "targets[0].aps.alert.loc-args must be a string or a list of strings"),
        ),
        (varied(message__aps={"category": "x"}), (13, "message.aps.category is unknown")),
        (
            varied(message__customParams={"k": "v"}),
            (6, "message.customParams must be a list of {key: ..., value: ...}"),
        ),
        (
            varied(message__customParams=[{"key": "k", "value": "v", "x": "y"}]),
            (13, "message.customParams[0].x is not part of a custom parameter {key, value}"),
        ),
        (varied(message__subjet="Hi"), (13, "message.subjet is unknown (did you mean subject?)")),
        (varied(colour="red"), (13, "colour is unknown")),
        (varied(targets=DELETE), (9, "targets must be a non-empty list of targets")),
        (varied(targets=[]), (9, "targets must be a non-empty list of targets")),
        (varied(targets=["765c8"]), (9, "targets[0] must be an object")),
        (
            varied(targets=[{"data": {"a": "b"}}]),
            (9, "targets[0] has no criterion, segmentId, staticListId nor staticListExternalId"),
        ),
        (
            varied(targets__0__opencount=3),
            (9, "targets[0].opencount must be a string or {operator, value}"),
        ),
        (
            varied(targets__0__opencount={"operator": ">", "value": 1}),
            (9, "targets[0].opencount.value must be a string"),
        ),
        (
            varied(targets__0__opencount={"Operator": ">", "Value": "1"}),
            (9, "targets[0].opencount.operator must be one of =, !=, <, <=, >, >="),
        ),
        (varied(targets__0__data=["x"]), (9, "targets[0].data must be an object of strings")),
        (varied(targets__0__aps={"badge": "2"}), (9, "targets[0].aps.badge must be an integer")),
        (varied(targets__0__aps={"mutable": 1}), (13, "targets[0].aps.mutable is unknown")),
        (varied(targets=[{"segmentId": "12"}]), (0, "")),
        (
            varied(targets=[{"staticListExternalId": 12}]),
            (9, "targets[0].staticListExternalId must be a non-empty string"),
        ),
        (
            several_apps(staticListId="9"),
            (9, "targets[0].staticListId is for single-application requests only"),
        ),
        (varied(message__language="fr"), (0, "")),
        (
            varied(message__language="xx"),
            (17, "message.language 'xx' is not one of en, fr, de, es, it, nl, pt"),
        ),
    ],
)
def test_details(body: Any, expected: tuple[int, str]) -> None:
    assert detail(body) == expected


def test_several_apps_details() -> None:
    body = json.loads(EXAMPLE_SEVERAL_APPS)
    request = body["sendInstantMessage"]
    request["messages"][1]["message"]["sound"] = "loud"
    assert detail(body) == (5, "messages[1].message.sound must be one of None, default, custom")
    del request["messages"][1]["parentMessageId"]
    assert detail(body) == (
        10,
        "messages[1] has neither parentMessageId nor parentMessageExternalId",
    )
    request["messages"][0]["partner"] = "p"
    assert detail(body)[0] == 4
    request["messages"] = []
    assert detail(body)[0] == 4
    mixed = json.loads(EXAMPLE_SEVERAL_APPS)
    mixed["sendInstantMessage"]["partner"] = {"id": "p"}
    assert detail(mixed) == (13, "partner is unknown")


def test_button_details() -> None:
    assert detail(buttons({"id": 1}, {"id": "2"}, template="yes_no_category"))[0] == 0
    assert detail(buttons({"id": 3}, template="yes_no_category")) == (
        24,
        "message.interactiveButtons.buttons[0].id 3 is beyond template 'yes_no_category', "
        "which has 2 buttons",
    )
    assert detail(buttons({"id": 7}, template="my_own_category"))[0] == 0  # not known here
    assert detail(buttons({"action": "close"})) == (
        24,
        "message.interactiveButtons.buttons[0].id is missing; give the button's number (1, 2, ...)",
    )
    assert detail(buttons({"id": True}))[0] == 24
    # The id is the button's number in its template, as the validator holds it.
    for ident in ("confirm", "", 0, -1, "0", "²", "1.0", 1.0):
        assert detail(buttons({"id": ident}))[0] == 24, ident
    assert detail(buttons({"id": "01"}))[0] == 0
    assert detail(buttons({"id": 1}, {"id": "1"})) == (
        24,
        "message.interactiveButtons.buttons[1].id 1 is used twice",
    )
    # Accengage's own button page spells it urlSheme: taken (validate warns), any other is not.
    assert detail(buttons({"id": 1, "action": "urlSheme"})) == (0, "")
    assert detail(buttons({"id": 1, "action": "urlschema"})) == (
        5,
        "message.interactiveButtons.buttons[0].action must be one of "
        "browser, email, phone, store, sms, webView, urlScheme, close",
    )
    assert detail(buttons({"id": 1, "destructive": "no"}))[0] == 5
    assert detail(buttons({"id": 1, "label": "x"}))[0] == 13
    assert detail(buttons({"id": 1, "customParams": [{"key": "k", "value": 2}]})) == (
        25,
        "message.interactiveButtons.buttons[0].customParams[0].value must be text",
    )
    assert detail(varied(message__interactiveButtons={"template": ""}))[0] == 23
    assert detail(varied(message__interactiveButtons={"buttons": {}}))[0] == 5
    assert detail(varied(message__interactiveButtons=[]))[0] == 5


def test_first_problem_in_code_order_wins() -> None:
    everything = varied(
        user=DELETE,
        message__sound="loud",
        message__unknown="x",
        targets=[{"data": {}}],
        message__language="xx",
    )
    assert detail(everything)[0] == 3
    assert detail(varied(message__sound="loud", message__unknown="x"))[0] == 5
    assert detail(varied(message__unknown="x", message__language="xx"))[0] == 13
    # Among problems of one code, the first met in the request wins.
    assert detail(varied(message__subject=1, message__text=2)) == (
        5,
        "message.subject must be a string",
    )
    assert CODE_ORDER[:4] == (2, 3, 4, 10)


# --- macros --------------------------------------------------------------------------------


def test_macros_fill_from_target_data_message_data_and_devices() -> None:
    text = "Hi ${first_name}, flight ${flightref}"
    filled = varied(message__text=text, message__data={"flightref": "EY5138"})
    assert detail(filled)[0] == 0  # first_name from device 765c8
    by_target = varied(
        message__text=text,
        targets=[{"language": "en", "data": {"first_name": "Ann", "flightref": "X"}}],
    )
    assert detail(by_target)[0] == 0


def test_macro_nothing_fills_is_code_15() -> None:
    assert detail(varied(message__text="Hi ${nickname}")) == (
        15,
        "${nickname} in message.text cannot be filled for targets[0]: not in its data nor "
        "the message's data, and device 765c8 has no nickname",
    )
    # English speakers include b3c77, which has no first name.
    assert detail(varied(message__subject="${first_name}", targets=[{"language": "en"}])) == (
        15,
        "${first_name} in message.subject cannot be filled for targets[0]: not in its data nor "
        "the message's data, and device b3c77 has no first_name",
    )
    unmatched = varied(message__longText="${first_name}", targets=[{"language": "ja"}])
    assert detail(unmatched)[1].endswith("and it matches no device")
    target_alert = varied(targets__0__aps={"alert": {"title": "${gate}"}})
    assert detail(target_alert)[1].startswith("${gate} in targets[0].aps.alert.title ")
    message_alert = varied(message__aps={"alert": "${gate}"})
    assert detail(message_alert)[1].startswith("${gate} in message.aps.alert ")


def test_criteria_compare_numbers_as_numbers() -> None:
    # "12" > "9" only as numbers: b3c77 (opencount 12, no first_name) is then matched.
    body = varied(
        message__text="${first_name}",
        targets=[{"opencount": {"operator": ">", "value": "9"}}],
    )
    assert detail(body)[1].endswith("device b3c77 has no first_name")
    others = varied(
        message__text="${first_name}",
        targets=[
            {
                "opencount": {"operator": "<=", "value": "3"},
                "language": {"operator": "!=", "value": "xx"},
            }
        ],
    )
    assert detail(others)[0] == 0


def test_device_table_and_fields_are_the_callers() -> None:
    body = varied(message__text="Hi ${first_name}")
    assert detail(body, devices={})[1].endswith("it matches no device")
    assert detail(body, devices={"765c8": {"first_name": "P"}})[0] == 0
    assert detail(body, devices={}, device_fields={"first_name"})[0] == 0
    assert detail(body, devices={}, device_fields=None)[0] == 0  # columns unknown: no code 15
    assert detail(varied(message__language="xx"), languages=None)[0] == 0
    assert detail(varied(message__language="xx"), languages=["xx"])[0] == 0


def test_segment_targets_fill_only_from_data() -> None:
    body = varied(message__text="Hi ${first_name}", targets=[{"segmentId": "1"}])
    assert detail(body)[1].endswith("it matches no device")
    body["sendInstantMessage"]["targets"][0]["data"] = {"first_name": "Ann"}
    assert detail(body)[0] == 0


def test_message_count() -> None:
    assert message_count(BASE) == 1
    assert message_count(json.loads(EXAMPLE_SEVERAL_APPS)) == 2
    assert message_count("junk") == 1


def test_default_devices_are_read_only() -> None:
    with pytest.raises(TypeError):
        DEFAULT_DEVICES["x"] = {}  # type: ignore[index]


# --- never raises --------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
#: Names the checker looks for, so random objects reach deep into it.
NAMES = st.sampled_from(
    [
        *api.SINGLE_APP_REQUEST_FIELDS,
        *api.MESSAGE_FIELDS,
        *api.TARGET_KEYS,
        *api.BUTTON_FIELDS,
        *api.APS_FIELDS,
        "messages",
        "buttons",
        "template",
        "operator",
        "value",
        "key",
        "memberId",
        "language",
    ]
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


@st.composite
def mutated_examples(draw: st.DrawFn) -> Any:
    """A documented example with a few subtrees replaced or keys added: near-valid requests."""
    body = copy.deepcopy(
        draw(
            st.sampled_from(
                [
                    json.loads(EXAMPLE_ONE_APP),
                    example_with_buttons(),
                    json.loads(EXAMPLE_SEVERAL_APPS),
                ]
            )
        )
    )
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(body)))
        if not path:
            return draw(JSON)
        node = body
        for part in path[:-1]:
            node = node[part]
        if isinstance(node, dict) and draw(st.booleans()):
            node[draw(NAMES)] = draw(JSON)
        else:
            node[path[-1]] = draw(JSON | st.dictionaries(NAMES, JSON, max_size=3))
    return body


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(JSON, mutated_examples()))
def test_never_raises(body: Any) -> None:
    code, label = check_request(body)
    assert code in api.RETURN_CODES
    assert label.startswith(api.RETURN_CODES[code])
