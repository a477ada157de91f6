# Fleetgate's gateway node and CLI in a container: built on the official Swift image, run on a slim Debian.
#   docker build -t fleetgate .
#   docker run --rm -e FLEETGATE_JWT_SECRET=… -p 8080:8080 fleetgate serve --host 0.0.0.0 --redis redis://redis:6379
# (docker-compose.yml starts a whole local fleet.)

FROM swift:6.2-bookworm AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libhiredis-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
# Dependencies first, so a change in Sources does not fetch them again.
COPY Package.swift ./
RUN swift package resolve
COPY Sources ./Sources
RUN swift build -c release --product fleetgate --static-swift-stdlib \
    && mkdir -p /out \
    && cp "$(swift build -c release --show-bin-path)/fleetgate" /out/ \
    && cp -R "$(swift build -c release --show-bin-path)/fleetgate_ConnectionLimiter.resources" /out/

FROM debian:bookworm-slim
# libhiredis0.14: the client library (Debian's hiredis 0.14); curl: the health check of /readyz.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libhiredis0.14 ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home fleetgate
# The Lua scripts travel as the resource bundle next to the binary.
COPY --from=build /out/ /usr/local/bin/
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=5s --timeout=2s --retries=3 CMD ["curl", "-fsS", "http://127.0.0.1:8080/readyz"]
ENTRYPOINT ["fleetgate"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
