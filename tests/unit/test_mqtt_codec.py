"""The MQTT codec: round trips, exact encodings, malformed input, aliases, split packets."""

from __future__ import annotations

import pytest

from gateway.errors import GatewayError
from gateway.ingress.codec import (
    MQTT_5,
    MQTT_311,
    PUBACK,
    PUBCOMP,
    PUBREC,
    PUBREL,
    Ack,
    Connack,
    Decoder,
    Disconnect,
    Pingresp,
    Properties,
    ProtocolError,
    Publish,
    Suback,
    SubscribeRequest,
    Version,
    decode_packet,
    decode_vbi,
    encode_ack,
    encode_connack,
    encode_connect,
    encode_disconnect,
    encode_pingreq,
    encode_properties,
    encode_puback,
    encode_pubcomp,
    encode_publish,
    encode_pubrec,
    encode_pubrel,
    encode_suback,
    encode_subscribe,
    encode_vbi,
)


@pytest.mark.parametrize(("value", "encoded"), [
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"),
    (16_384, b"\x80\x80\x01"), (2_097_151, b"\xff\xff\x7f"), (2_097_152, b"\x80\x80\x80\x01"),
    (268_435_455, b"\xff\xff\xff\x7f"),
])
def test_variable_byte_integer_round_trip(value: int, encoded: bytes) -> None:
    assert encode_vbi(value) == encoded
    assert decode_vbi(encoded, 0, len(encoded)) == (value, len(encoded))


def test_variable_byte_integer_limits() -> None:
    with pytest.raises(ValueError):
        encode_vbi(268_435_456)
    with pytest.raises(ProtocolError):
        decode_vbi(b"\xff\xff\xff\xff\x01", 0, 5)


def test_protocol_error_is_a_gateway_error() -> None:
    assert issubclass(ProtocolError, GatewayError)


# -- client -> server encodings ----------------------------------------------------------


def test_connect_v311_exact_bytes() -> None:
    packet = encode_connect("gw", version=MQTT_311, keepalive=30, clean_start=False,
                            username="u", password="p")
    body = b"\x00\x04MQTT\x04" + bytes([0xC0]) + b"\x00\x1e" + b"\x00\x02gw" + b"\x00\x01u\x00\x01p"
    assert packet == bytes([0x10, len(body)]) + body


def test_connect_v5_properties_and_flags() -> None:
    packet = encode_connect("gw", version=MQTT_5, keepalive=60, clean_start=False,
                            session_expiry=604_800, receive_maximum=2000)
    props = b"\x11" + (604_800).to_bytes(4, "big") + b"\x21" + (2000).to_bytes(2, "big")
    body = (b"\x00\x04MQTT\x05\x00\x00\x3c" + bytes([len(props)]) + props + b"\x00\x02gw")
    assert packet == bytes([0x10, len(body)]) + body
    clean = encode_connect("gw", version=MQTT_5, clean_start=True)
    assert clean[9] & 0x02  # the clean start flag


def test_subscribe_v5_options_including_no_local() -> None:
    packet = encode_subscribe(7, [SubscribeRequest("a/#", 1, no_local=True,
                                                   retain_as_published=True, retain_handling=1),
                                  SubscribeRequest("b", 2)], version=MQTT_5)
    assert packet[0] == 0x82
    body = b"\x00\x07\x00" + b"\x00\x03a/#" + bytes([0x01 | 0x04 | 0x08 | 0x10]) + b"\x00\x01b\x02"
    assert packet[2:] == body
    v311 = encode_subscribe(7, [SubscribeRequest("a/#", 1, no_local=True)], version=MQTT_311)
    assert v311 == b"\x82\x08\x00\x07\x00\x03a/#\x01"


def test_acks_omit_a_zero_reason_code_on_v5() -> None:
    assert encode_puback(0x1234) == b"\x40\x02\x12\x34"
    assert encode_puback(0x1234, 0x97) == b"\x40\x03\x12\x34\x97"
    assert encode_puback(0x1234, 0x97, version=MQTT_311) == b"\x40\x02\x12\x34"
    assert encode_pubrec(1, 0x97) == b"\x50\x03\x00\x01\x97"
    assert encode_pubrel(1) == b"\x62\x02\x00\x01"
    assert encode_pubcomp(1) == b"\x70\x02\x00\x01"
    assert encode_pingreq() == b"\xc0\x00"
    assert encode_disconnect() == b"\xe0\x00"
    assert encode_disconnect(0x04) == b"\xe0\x02\x04\x00"
    assert encode_disconnect(version=MQTT_311) == b"\xe0\x00"


# -- server -> client round trips ---------------------------------------------------------


def test_connack_round_trip() -> None:
    props = Properties(server_keep_alive=20, receive_maximum=100, assigned_client_identifier="x")
    packet = decode_packet(encode_connack(True, 0, properties=props))
    assert packet == Connack(True, 0, props)
    assert decode_packet(encode_connack(False, 5, version=MQTT_311), MQTT_311) == Connack(False, 5)


def test_suback_with_failure_codes() -> None:
    assert decode_packet(encode_suback(3, [1, 0x80, 2])) == Suback(3, [1, 0x80, 2], Properties())
    assert decode_packet(encode_suback(3, [0x80], version=MQTT_311), MQTT_311) == Suback(3, [0x80])


@pytest.mark.parametrize("payload", [b"", b'{"t": 21.5}', "température".encode(),
                                     bytes(range(256)) * 40])
@pytest.mark.parametrize("v", [MQTT_311, MQTT_5])
def test_publish_round_trip(payload: bytes, v: Version) -> None:
    for qos, pid in ((0, 0), (1, 513), (2, 65535)):
        packet = decode_packet(encode_publish("a/b/ü", payload, qos=qos, packet_id=pid,
                                              dup=True, retain=True, version=v), v)
        assert isinstance(packet, Publish)
        assert (packet.topic, packet.payload, packet.qos, packet.packet_id) == (
            "a/b/ü", payload, qos, pid)
        assert packet.dup and packet.retain
        assert type(packet.payload) is bytes


def test_publish_v5_properties() -> None:
    props = Properties(content_type="application/json", payload_format_indicator=1,
                       message_expiry_interval=60, response_topic="r", correlation_data=b"\x00c",
                       subscription_identifiers=[5, 300],
                       user_properties=[("site", "north"), ("site", "south"), ("k", "")])
    packet = decode_packet(encode_publish("t", b"x", qos=1, packet_id=1, properties=props))
    assert isinstance(packet, Publish)
    assert packet.properties == props
    assert "content_type='application/json'" in repr(packet.properties)


def test_acks_and_control_packets_decode() -> None:
    assert decode_packet(b"\x62\x02\x00\x09") == Ack(PUBREL, 9)
    assert decode_packet(b"\x62\x03\x00\x09\x92") == Ack(PUBREL, 9, 0x92)
    assert decode_packet(b"\x40\x02\x00\x01", MQTT_311) == Ack(PUBACK, 1)
    assert decode_packet(encode_ack(PUBREC, 4, 0x10)) == Ack(PUBREC, 4, 0x10)
    assert decode_packet(encode_ack(PUBCOMP, 4)) == Ack(PUBCOMP, 4)
    assert decode_packet(b"\xd0\x00") == Pingresp()
    assert decode_packet(b"\xe0\x00") == Disconnect(0)
    reason = encode_properties(Properties(reason_string="bye"))
    assert decode_packet(b"\xe0" + bytes([1 + len(reason)]) + b"\x8b" + reason) == Disconnect(
        0x8B, Properties(reason_string="bye"))


# -- topic aliases ---------------------------------------------------------------------


def test_topic_alias_is_resolved_per_decoder() -> None:
    decoder = Decoder(MQTT_5)
    first = encode_publish("sensors/a", b"1", qos=1, packet_id=1,
                           properties=Properties(topic_alias=3))
    second = encode_publish("", b"2", qos=1, packet_id=2, properties=Properties(topic_alias=3))
    remap = encode_publish("sensors/b", b"3", properties=Properties(topic_alias=3))
    third = encode_publish("", b"4", properties=Properties(topic_alias=3))
    packets = decoder.feed(first + second + remap + third)
    assert [p.topic for p in packets if isinstance(p, Publish)] == [
        "sensors/a", "sensors/a", "sensors/b", "sensors/b"]
    with pytest.raises(ProtocolError, match="unknown topic alias"):
        Decoder(MQTT_5).feed(second)


def test_topic_alias_zero_and_missing_topic_are_errors() -> None:
    with pytest.raises(ProtocolError, match="alias 0"):
        decode_packet(encode_publish("t", b"", properties=Properties(topic_alias=0)))
    with pytest.raises(ProtocolError, match="without a topic"):
        decode_packet(encode_publish("", b""))


# -- incremental decoding ------------------------------------------------------------------


def test_packets_split_at_every_byte_boundary() -> None:
    stream = (encode_connack(False, 0) + encode_publish("a", b"x" * 300, qos=1, packet_id=1)
              + encode_publish("b", b"", qos=2, packet_id=2) + b"\x62\x02\x00\x02" + b"\xd0\x00")
    expected = Decoder(MQTT_5).feed(stream)
    assert len(expected) == 5
    for cut in range(1, len(stream)):
        decoder = Decoder(MQTT_5)
        got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert got == expected, cut
        assert decoder.pending == 0


def test_byte_by_byte_feed() -> None:
    stream = encode_publish("t/1", b"p" * 200, qos=1, packet_id=5) * 3
    decoder = Decoder(MQTT_5)
    got = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i:i + 1])
    assert [p.packet_id for p in got if isinstance(p, Publish)] == [5, 5, 5]


# -- malformed input -------------------------------------------------------------------


def test_truncated_packet_waits_and_decode_packet_refuses() -> None:
    packet = encode_publish("t", b"payload", qos=1, packet_id=1)
    decoder = Decoder(MQTT_5)
    assert decoder.feed(packet[:-1]) == []
    assert decoder.pending == len(packet) - 1
    with pytest.raises(ProtocolError):
        decode_packet(packet[:-1])
    with pytest.raises(ProtocolError):
        decode_packet(packet + b"\x00")


def test_bad_remaining_length() -> None:
    with pytest.raises(ProtocolError, match="longer than 4 bytes"):
        Decoder(MQTT_5).feed(b"\x30\xff\xff\xff\xff\x01")
    with pytest.raises(ProtocolError, match="exceeds"):
        Decoder(MQTT_5, max_packet_size=1000).feed(b"\x30\x80\x80\x01")


def test_fields_running_past_the_packet_end() -> None:
    # topic length 10 in a packet with 4 bytes of body
    with pytest.raises(ProtocolError, match="topic runs past"):
        decode_packet(b"\x30\x04\x00\x0aab")
    # QoS 1 without room for the packet id
    with pytest.raises(ProtocolError, match="packet id"):
        decode_packet(b"\x32\x03\x00\x01a", MQTT_311)
    # v5 property length larger than what is left
    with pytest.raises(ProtocolError, match="property length"):
        decode_packet(b"\x30\x05\x00\x01a\x09\x01")
    with pytest.raises(ProtocolError):
        decode_packet(b"\x40\x01\x00")


def test_bad_utf8_and_nul_in_topic() -> None:
    with pytest.raises(ProtocolError, match="UTF-8"):
        decode_packet(b"\x30\x04\x00\x02\xc3\x28", MQTT_311)
    with pytest.raises(ProtocolError, match="U\\+0000"):
        decode_packet(b"\x30\x04\x00\x02a\x00", MQTT_311)
    surrogate = "\ud800".encode("utf-8", "surrogatepass")
    with pytest.raises(ProtocolError, match="UTF-8"):
        decode_packet(b"\x30\x05\x00\x03" + surrogate, MQTT_311)


def test_other_malformed_packets() -> None:
    with pytest.raises(ProtocolError, match="QoS 3"):
        decode_packet(b"\x36\x05\x00\x01a\x00\x01", MQTT_311)
    with pytest.raises(ProtocolError, match="packet id 0"):
        decode_packet(b"\x32\x05\x00\x01a\x00\x00", MQTT_311)
    with pytest.raises(ProtocolError, match="unknown property"):
        decode_packet(b"\x30\x06\x00\x01a\x02\x7f\x00")
    with pytest.raises(ProtocolError, match="twice"):
        decode_packet(b"\x30\x08\x00\x01a\x04\x01\x01\x01\x01")
    with pytest.raises(ProtocolError, match="unexpected packet type"):
        decode_packet(b"\x10\x00")
    with pytest.raises(ProtocolError, match="flags"):
        decode_packet(b"\x60\x02\x00\x01")  # PUBREL must carry flags 0b0010
    with pytest.raises(ProtocolError, match="DISCONNECT"):
        decode_packet(b"\xe0\x00", MQTT_311)
    with pytest.raises(ProtocolError, match="reason codes"):
        decode_packet(b"\x90\x03\x00\x01\x00")
