"""Generated from proto/dsd.proto by tools/gen_proto.py. Do not edit."""
