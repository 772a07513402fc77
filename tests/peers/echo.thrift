// The service the Thrift test peers speak: small enough to read, wide enough to exercise every
// Thrift type on the wire (Payload) and every message type (call, oneway, reply, declared
// exception, TApplicationException).

exception EchoError {
  1: string message,
}

struct Inner {
  1: i32 id,
  2: string label,
}

struct Payload {
  1: bool flag,
  2: byte small,
  3: i16 short_number,
  4: i32 number,
  5: i64 big_number,
  6: double ratio,
  7: string text,
  8: binary blob,
  9: list<i32> numbers,
  10: set<string> tags,
  11: map<string, i64> counters,
  12: Inner inner,
  13: list<Inner> inners,
  14: map<i32, list<bool>> flags_by_id,
  300: bool far_flag,  // a field-id jump too large for a compact delta
}

service Echo {
  // The name of the server instance that answered: tells routed backends apart.
  string whoami(),
  string echo(1: string s),
  // Recorded by the server; tests wait for it to arrive.
  oneway void notify(1: string s),
  // declared = true: the declared EchoError; false: a TApplicationException (INTERNAL_ERROR).
  string fail(1: string message, 2: bool declared) throws (1: EchoError err),
  Payload mirror(1: Payload payload),
  void ping(),
}
