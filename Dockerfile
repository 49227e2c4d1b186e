# Strata CSI driver. Build: docker build -t strata .
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin strata

# The runtime carries the tools Strata shells out to: mkfs/resize for ext4 and xfs, btrfs,
# blkid and losetup (util-linux), e2fsck.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends e2fsprogs xfsprogs btrfs-progs util-linux \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/strata /usr/local/bin/strata
ENTRYPOINT ["/usr/local/bin/strata"]
CMD ["serve", "--help"]
