"""Link emulation for DSD test networks: ``tc netem`` scripts (tc_netem.sh, entrypoint.sh) and a userspace
TCP link emulator (:mod:`netem.link_emulator`) for kernels without the netem qdisc."""
