"""A device on the gateway's local broker, played by the Eclipse Paho MQTT 3.1.1 client
(paho-mqtt 1.6.1 in .venv-test): one step per run, so that the test can restart the
gateway between steps. Prints what it saw, one `key=value` or `message ...` line each.

    paho_client.py PORT retain-set TOPIC PAYLOAD       publish retained at QoS 1
    paho_client.py PORT retain-get TOPIC               print the retained message, if any
    paho_client.py PORT will-arm CLIENT TOPIC PAYLOAD  connect with a retained will, then die
    paho_client.py PORT sub-leave CLIENT FILTER        persistent session, subscribe QoS 1, leave
    paho_client.py PORT publish TOPIC PAYLOAD          publish at QoS 1
    paho_client.py PORT resume CLIENT SECONDS          persistent session, no subscribe: print
                                                       session present and what arrives

Every step has a deadline; exit code 2 when the broker did not answer in time.
"""

import os
import sys
import threading
import time

import paho.mqtt.client as mqtt

HOST = "127.0.0.1"
DEADLINE = 10.0


def fail(what):
    print(f"error={what}", flush=True)
    sys.exit(2)


def connect(port, client_id="", clean=True, will=None):
    client = mqtt.Client(client_id=client_id, clean_session=clean, protocol=mqtt.MQTTv311)
    connected = threading.Event()
    state = {}

    def on_connect(_client, _userdata, flags, rc):
        state["rc"] = rc
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


def main():
    port = int(sys.argv[1])
    step, args = sys.argv[2], sys.argv[3:]
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
        client = mqtt.Client(client_id=args[0], clean_session=False, protocol=mqtt.MQTTv311)
        got = collect(client)
        connected = threading.Event()
        state = {}

        def on_connect(_client, _userdata, flags, rc):
            # Printed here, on paho's network thread, so it comes before the queued messages.
            state["rc"] = rc
            print(f"session_present={flags.get('session present', 0)}", flush=True)
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
