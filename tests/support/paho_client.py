"""A device on the gateway's local broker, played by the Eclipse Paho client (paho-mqtt
2.1.0 in .venv-test): one step per run, so that the test can restart the gateway between
steps.

MQTT 3.1.1 steps print what they saw, one `key=value` or `message ...` line each:

    paho_client.py PORT retain-set TOPIC PAYLOAD       publish retained at QoS 1
    paho_client.py PORT retain-get TOPIC               print the retained message, if any
    paho_client.py PORT will-arm CLIENT TOPIC PAYLOAD  connect with a retained will, then die
    paho_client.py PORT sub-leave CLIENT FILTER        persistent session, subscribe QoS 1, leave
    paho_client.py PORT publish TOPIC PAYLOAD          publish at QoS 1
    paho_client.py PORT resume CLIENT SECONDS          persistent session, no subscribe: print
                                                       session present and what arrives

MQTT 5 steps print one JSON object a line, each with an "event": "subscribed" (the SUBACK's
reason codes), "published" (the PUBACK's), "message" (topic, payload, qos, retain and the
properties it came with, only those present: user_properties as [name, value] pairs in
order, content_type, payload_format_indicator, response_topic, correlation_data (as
UTF-8), message_expiry_interval, subscription_identifiers):

    paho_client.py PORT v5-pub CLIENT TOPIC PAYLOAD [PROPERTIES]
                            publish at QoS 1; PROPERTIES is a JSON object with the keys
                            of a "message" line above (subscription_identifiers aside)
    paho_client.py PORT v5-sub CLIENT FILTER SUB_ID COUNT
                            clean start, subscribe QoS 1 with subscription identifier
                            SUB_ID (0: none), print COUNT messages, leave
    paho_client.py PORT v5-echo CLIENT FILTER
                            subscribe, answer the first request that has a response topic
                            (its payload, correlation data and user properties back to its
                            response topic, QoS 1), print the request, leave
    paho_client.py PORT v5-request CLIENT TOPIC RESPONSE_TOPIC CORRELATION PAYLOAD
                            subscribe RESPONSE_TOPIC, publish PAYLOAD to TOPIC with that
                            response topic and correlation data, print the response

Every step has a deadline; exit code 2 when the broker did not answer in time.
"""

import json
import os
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

HOST = "127.0.0.1"
DEADLINE = 10.0

# paho-mqtt 2.x hands a 3.1.1 CONNACK return code to on_connect as an MQTT 5 reason code;
# these steps print the 3.1.1 number, as they always have.
V311_CONNACK = {
    "Success": 0,
    "Unsupported protocol version": 1,
    "Client identifier not valid": 2,
    "Server unavailable": 3,
    "Bad user name or password": 4,
    "Not authorized": 5,
}


def fail(what):
    print(f"error={what}", flush=True)
    sys.exit(2)


def client_v311(client_id="", clean=True):
    return mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean,
        protocol=mqtt.MQTTv311,
    )


def connect(port, client_id="", clean=True, will=None):
    client = client_v311(client_id, clean)
    connected = threading.Event()
    state = {}

    def on_connect(_client, _userdata, _flags, reason_code, _properties):
        state["rc"] = V311_CONNACK.get(reason_code.getName(), reason_code.value)
        connected.set()

    client.on_connect = on_connect
    if will is not None:
        topic, payload = will
        client.will_set(topic, payload, qos=1, retain=True)
    client.connect(HOST, port, keepalive=30)
    client.loop_start()
    if not connected.wait(DEADLINE):
        fail("no CONNACK")
    if state["rc"] != 0:
        fail(f"CONNACK {state['rc']}")
    return client, state


def wait_publish(info):
    info.wait_for_publish(DEADLINE)
    if not info.is_published():
        fail("no PUBACK")


def collect(client):
    """Prints every message that arrives; returns the list they are kept in."""
    lock = threading.Lock()  # paho calls back on its network thread
    got = []

    def on_message(_client, _userdata, message):
        with lock:
            got.append(message)
            print(
                f"message topic={message.topic} payload={message.payload.decode(errors='replace')}"
                f" qos={message.qos} retain={int(message.retain)} dup={int(message.dup)}",
                flush=True,
            )

    client.on_message = on_message
    return got


def subscribe_and_wait(client, *args, **kwargs):
    """SUBSCRIBE, then wait for the SUBACK; returns its reason codes (MQTT 5 steps)."""
    subscribed = threading.Event()
    codes = []

    def on_subscribe(_client, _userdata, _mid, reason_codes, _properties):
        codes.extend(rc.value for rc in reason_codes)
        subscribed.set()

    client.on_subscribe = on_subscribe
    client.subscribe(*args, **kwargs)
    if not subscribed.wait(DEADLINE):
        fail("no SUBACK")
    return codes


# MQTT 5 steps.

# JSON key -> paho's PUBLISH property name.
PROPERTY_NAMES = {
    "content_type": "ContentType",
    "payload_format_indicator": "PayloadFormatIndicator",
    "response_topic": "ResponseTopic",
    "correlation_data": "CorrelationData",
    "message_expiry_interval": "MessageExpiryInterval",
}


def emit(event, **fields):
    print(json.dumps({"event": event, **fields}, sort_keys=True), flush=True)


def publish_properties(spec):
    """paho Properties for a PUBLISH from a JSON object (the keys of a "message" line)."""
    properties = Properties(PacketTypes.PUBLISH)
    for key, value in spec.items():
        if key == "user_properties":
            properties.UserProperty = [tuple(pair) for pair in value]
        elif key == "correlation_data":
            properties.CorrelationData = value.encode()
        elif key in PROPERTY_NAMES:
            setattr(properties, PROPERTY_NAMES[key], value)
        else:
            fail(f"unknown property {key}")
    return properties


def describe(message):
    """A received message as the fields of a "message" line."""
    fields = {
        "topic": message.topic,
        "payload": message.payload.decode(errors="replace"),
        "qos": message.qos,
        "retain": bool(message.retain),
    }
    properties = message.properties
    if properties is None:
        return fields
    if hasattr(properties, "UserProperty"):
        fields["user_properties"] = [list(pair) for pair in properties.UserProperty]
    for key, name in PROPERTY_NAMES.items():
        if hasattr(properties, name):
            value = getattr(properties, name)
            fields[key] = value.decode(errors="replace") if isinstance(value, bytes) else value
    if hasattr(properties, "SubscriptionIdentifier"):
        fields["subscription_identifiers"] = list(properties.SubscriptionIdentifier)
    return fields


def connect_v5(port, client_id):
    """Clean start, no session expiry; on_message is set before CONNECT."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    lock = threading.Lock()
    got = []
    arrived = threading.Condition(lock)

    def on_message(_client, _userdata, message):
        with arrived:
            got.append(message)
            arrived.notify_all()

    connected = threading.Event()
    state = {}

    def on_connect(_client, _userdata, _flags, reason_code, _properties):
        state["rc"] = reason_code.value
        connected.set()

    published = {}
    acked = threading.Condition(threading.Lock())

    def on_publish(_client, _userdata, mid, reason_code, _properties):
        with acked:
            published[mid] = reason_code.value
            acked.notify_all()

    client.on_message = on_message
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(HOST, port, keepalive=30, clean_start=True)
    client.loop_start()
    if not connected.wait(DEADLINE):
        fail("no CONNACK")
    if state["rc"] != 0:
        fail(f"CONNACK {state['rc']:#04x}")

    def publish(topic, payload, properties):
        info = client.publish(topic, payload, qos=1, properties=properties)
        end = time.monotonic() + DEADLINE
        with acked:
            while info.mid not in published:
                left = end - time.monotonic()
                if left <= 0:
                    fail("no PUBACK")
                acked.wait(left)
            return published[info.mid]

    def next_message(index):
        """The index-th message (from 0) that arrived, waiting until DEADLINE for it."""
        end = time.monotonic() + DEADLINE
        with arrived:
            while len(got) <= index:
                left = end - time.monotonic()
                if left <= 0:
                    fail("no message")
                arrived.wait(left)
            return got[index]

    return client, publish, next_message


def v5_step(port, step, args):
    if step == "v5-pub":
        client_id, topic, payload = args[:3]
        spec = json.loads(args[3]) if len(args) > 3 else {}
        client, publish, _ = connect_v5(port, client_id)
        emit("published", reason_code=publish(topic, payload, publish_properties(spec)))
    elif step == "v5-sub":
        client_id, topic_filter, sub_id, count = args[0], args[1], int(args[2]), int(args[3])
        client, _, next_message = connect_v5(port, client_id)
        properties = None
        if sub_id:
            properties = Properties(PacketTypes.SUBSCRIBE)
            properties.SubscriptionIdentifier = sub_id
        codes = subscribe_and_wait(client, topic_filter, qos=1, properties=properties)
        emit("subscribed", reason_codes=codes)
        for index in range(count):
            emit("message", **describe(next_message(index)))
    elif step == "v5-echo":
        client_id, topic_filter = args[:2]
        client, publish, next_message = connect_v5(port, client_id)
        emit("subscribed", reason_codes=subscribe_and_wait(client, topic_filter, qos=1))
        index = 0
        while True:
            request = next_message(index)
            index += 1
            emit("message", **describe(request))
            asked = request.properties
            if asked is not None and hasattr(asked, "ResponseTopic"):
                break
        answer = Properties(PacketTypes.PUBLISH)
        if hasattr(asked, "CorrelationData"):
            answer.CorrelationData = asked.CorrelationData
        if hasattr(asked, "UserProperty"):
            answer.UserProperty = list(asked.UserProperty)
        emit("published", reason_code=publish(asked.ResponseTopic, request.payload, answer))
    elif step == "v5-request":
        client_id, topic, response_topic, correlation, payload = args[:5]
        client, publish, next_message = connect_v5(port, client_id)
        emit("subscribed", reason_codes=subscribe_and_wait(client, response_topic, qos=1))
        emit(
            "published",
            reason_code=publish(
                topic,
                payload,
                publish_properties(
                    {"response_topic": response_topic, "correlation_data": correlation}
                ),
            ),
        )
        emit("message", **describe(next_message(0)))
    else:
        fail(f"unknown step {step}")
    client.disconnect()
    client.loop_stop()


def main():
    port = int(sys.argv[1])
    step, args = sys.argv[2], sys.argv[3:]
    if step.startswith("v5-"):
        v5_step(port, step, args)
        return
    if step == "retain-set":
        client, _ = connect(port)
        wait_publish(client.publish(args[0], args[1], qos=1, retain=True))
        client.disconnect()
    elif step == "publish":
        client, _ = connect(port)
        wait_publish(client.publish(args[0], args[1], qos=1))
        client.disconnect()
    elif step == "retain-get":
        client, _ = connect(port)
        got = collect(client)
        subscribed = threading.Event()
        client.on_subscribe = lambda *_: subscribed.set()
        client.subscribe(args[0], qos=1)
        if not subscribed.wait(DEADLINE):
            fail("no SUBACK")
        end = time.monotonic() + 2.0
        while not got and time.monotonic() < end:
            time.sleep(0.02)
        client.disconnect()
    elif step == "will-arm":
        client, _ = connect(port, args[0], will=(args[1], args[2]))
        # Gone without DISCONNECT, as a device that loses power: the broker sends the will.
        os._exit(0)
    elif step == "sub-leave":
        client, _ = connect(port, args[0], clean=False)
        subscribed = threading.Event()
        client.on_subscribe = lambda *_: subscribed.set()
        client.subscribe(args[1], qos=1)
        if not subscribed.wait(DEADLINE):
            fail("no SUBACK")
        client.disconnect()
    elif step == "resume":
        # on_message must be set before CONNECT: queued messages follow the CONNACK at once.
        client = client_v311(args[0], clean=False)
        got = collect(client)
        connected = threading.Event()
        state = {}

        def on_connect(_client, _userdata, flags, reason_code, _properties):
            # Printed here, on paho's network thread, so it comes before the queued messages.
            state["rc"] = V311_CONNACK.get(reason_code.getName(), reason_code.value)
            print(f"session_present={int(flags.session_present)}", flush=True)
            connected.set()

        client.on_connect = on_connect
        client.connect(HOST, port, keepalive=30)
        client.loop_start()
        if not connected.wait(DEADLINE):
            fail("no CONNACK")
        if state["rc"] != 0:
            fail(f"CONNACK {state['rc']}")
        time.sleep(float(args[1]))
        client.disconnect()
    else:
        fail(f"unknown step {step}")
    client.loop_stop()


if __name__ == "__main__":
    main()
