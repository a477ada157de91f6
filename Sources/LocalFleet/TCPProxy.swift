import NIOCore
import NIOPosix
import Synchronization

/// A loopback TCP proxy in front of one upstream (typically a ``RedisServer``), whose link can be cut, stalled or
/// delayed while other clients keep their direct link: the partitions of tests and of the chaos runner.
///
/// Clients connect to ``address`` instead of the upstream; each accepted connection gets its own upstream connection
/// on the same event loop, and bytes are copied between the two unchanged. The fault modes apply to every proxied
/// connection, current and future:
///
/// - ``cut()`` closes every proxied connection and refuses new ones (a crashed or unreachable server);
/// - ``stall()`` forwards nothing but keeps connections open (a black-holed network);
/// - ``delay(_:)`` forwards everything late (a slow network);
/// - ``restore()`` undoes all of them.
///
/// Mode changes apply to every byte the proxy reads after the call returns; closing connections for ``cut()`` and
/// flushing held bytes for ``restore()`` happen asynchronously on the connections' event loops, within microseconds.
/// A connection closed by either peer (including a half-close) is closed on the other side too, after the bytes
/// already received from the closing peer have been delivered. Data is buffered in the proxy without back-pressure;
/// a connection holding more than 16 MiB of undelivered bytes (stalled or delayed) is closed.
///
/// All methods are safe to call from any thread or task.
public final class TCPProxy: Sendable {
    /// The port the proxy listens on (on `127.0.0.1`), picked by the kernel.
    public let port: Int

    /// `"127.0.0.1:<port>"`: where clients connect to reach the upstream through the proxy.
    public var address: String {
        "\(Sockets.loopbackHost):\(port)"
    }

    /// `"redis://127.0.0.1:<port>"`: the proxy's address as a Redis URL.
    public var url: String {
        "redis://\(address)"
    }

    /// Number of currently open proxied connections: accepted and not yet closed on both sides (connections refused
    /// while cut are not counted).
    public var connectionCount: Int {
        registry.connectionCount
    }

    /// Number of connections accepted and proxied since the start (open or closed; refused ones not counted).
    public var acceptedCount: Int {
        registry.acceptedCount
    }

    private let listener: any Channel
    private let registry: ProxyRegistry

    private init(port: Int, listener: any Channel, registry: ProxyRegistry) {
        self.port = port
        self.listener = listener
        self.registry = registry
    }

    /// Best effort when ``stop()`` was not called: starts closing the listener and every proxied connection (without
    /// waiting for them).
    deinit {
        listener.close(promise: nil)
        _ = registry.shutDown()
    }

    /// Starts a proxy listening on `127.0.0.1` (on a free port) that forwards every connection to
    /// `upstreamHost:upstreamPort`.
    ///
    /// The upstream does not need to be reachable yet: each proxied connection connects to it when accepted, and is
    /// closed at once if that fails.
    /// - Throws: ``LocalFleetError`` if the upstream address is invalid or the proxy cannot listen.
    public static func start(upstreamHost: String = "127.0.0.1", upstreamPort: Int) async throws -> TCPProxy {
        let upstreamDescription = "\(upstreamHost):\(upstreamPort)"
        guard (1...65_535).contains(upstreamPort) else {
            throw LocalFleetError("TCPProxy needs an upstream port in 1...65535, got \(upstreamDescription)")
        }
        let upstream: SocketAddress
        do {
            upstream = try SocketAddress.makeAddressResolvingHost(upstreamHost, port: upstreamPort)
        } catch {
            throw LocalFleetError("TCPProxy cannot resolve its upstream \(upstreamDescription): \(error)")
        }
        let registry = ProxyRegistry(upstream: upstream)
        let bootstrap = ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.backlog, value: 128)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                registry.accept(channel)
            }
        let listener: any Channel
        do {
            listener = try await bootstrap.bind(host: Sockets.loopbackHost, port: 0).get()
        } catch {
            throw LocalFleetError("TCPProxy for \(upstreamDescription) cannot listen on \(Sockets.loopbackHost): \(error)")
        }
        guard let port = listener.localAddress?.port else {
            try? await listener.close().get()
            throw LocalFleetError("TCPProxy for \(upstreamDescription) cannot read back its listening port on \(Sockets.loopbackHost)")
        }
        return TCPProxy(port: port, listener: listener, registry: registry)
    }

    /// Close every proxied connection (both sides) and refuse new ones (accept and close at once) until
    /// ``restore()`` (or ``stall()``).
    ///
    /// Clients see their connection closed (EOF, or a reset if data was in flight) right away; held or delayed bytes
    /// are dropped. Clients connected to the upstream directly are not affected.
    public func cut() {
        registry.update { $0.mode = .cut }
    }

    /// Keep connections open but forward nothing in either direction (a black hole: peers see no reset, requests
    /// time out); bytes received meanwhile are held and delivered on ``restore()``, in order.
    ///
    /// New connections are accepted (and connected to the upstream) but also stalled. A connection holding more than
    /// 16 MiB is closed. Calling this after ``cut()`` accepts new connections again.
    public func stall() {
        registry.update { $0.mode = .stalled }
    }

    /// Forward every chunk after this extra delay (both directions, order kept), so a request/reply round trip takes
    /// at least twice `latency` longer. `.zero` = no delay.
    ///
    /// The delay applies to bytes received from now on; chunks already waiting keep their delivery time (and later
    /// chunks never overtake them). Independent of ``cut()`` and ``stall()``; ``restore()`` resets it to `.zero`.
    public func delay(_ latency: Duration) {
        precondition(latency >= .zero, "TCPProxy.delay needs a non-negative latency, got \(latency)")
        let amount = TimeAmount(latency)
        registry.update { $0.latency = amount }
    }

    /// Back to normal forwarding without delay (flushes held bytes after a stall; cut connections stay closed, new
    /// ones work).
    public func restore() {
        registry.update {
            $0.mode = .forwarding
            $0.latency = .zero
        }
    }

    /// Stop listening and close everything. Idempotent.
    ///
    /// When this returns, the port refuses connections and every proxied connection is closed on both sides.
    public func stop() async {
        let closing = registry.shutDown()
        try? await listener.close().get()
        for closed in closing {
            try? await closed.get()
        }
    }
}

// MARK: - Shared state

/// The proxy's shared mutable state (fault mode and open connections), reachable from the listener's child
/// initializer without keeping the ``TCPProxy`` itself alive (so its `deinit` can run).
private final class ProxyRegistry: Sendable {
    /// How connections forward right now.
    enum Mode: Sendable, Equatable {
        case forwarding
        case stalled
        case cut
    }

    /// What every connection applies: read for every chunk received, and pushed to idle connections on change.
    struct Settings: Sendable {
        var mode = Mode.forwarding
        var latency = TimeAmount.zero
    }

    /// An open connection, as seen from outside its event loop.
    struct Entry: Sendable {
        let link: NIOLoopBound<ProxyLink>
        /// Completed when both sides of the connection are closed.
        let closed: EventLoopFuture<Void>
    }

    private struct State {
        var settings = Settings()
        var stopped = false
        var nextID = 0
        var links: [Int: Entry] = [:]
    }

    /// Failure of the child initializer: the accepted connection is closed at once.
    private struct Refused: Error {}

    let upstream: SocketAddress
    private let state = Mutex(State())

    init(upstream: SocketAddress) {
        self.upstream = upstream
    }

    var connectionCount: Int {
        state.withLock { $0.links.count }
    }

    var acceptedCount: Int {
        state.withLock { $0.nextID }
    }

    /// The settings in force right now.
    var settings: Settings {
        state.withLock { $0.settings }
    }

    /// Sets up a just-accepted connection (called on its event loop), or refuses it while cut or stopped.
    func accept(_ channel: any Channel) -> EventLoopFuture<Void> {
        // Register under the lock, so a concurrent mode change either is captured here or reaches this link.
        let registered = state.withLock { state -> (id: Int, entry: Entry)? in
            guard !state.stopped, state.settings.mode != .cut else { return nil }
            let id = state.nextID
            state.nextID += 1
            let link = ProxyLink(client: channel, registry: self)
            let entry = Entry(link: NIOLoopBound(link, eventLoop: channel.eventLoop), closed: link.closed)
            state.links[id] = entry
            return (id, entry)
        }
        guard let (id, entry) = registered else {
            return channel.eventLoop.makeFailedFuture(Refused())
        }
        entry.closed.whenComplete { _ in
            self.state.withLock { _ = $0.links.removeValue(forKey: id) }
        }
        entry.link.value.start(upstream: upstream)
        return channel.eventLoop.makeSucceededVoidFuture()
    }

    /// Changes the settings, then lets every open connection act on them (close when cut, flush held bytes).
    func update(_ change: (inout Settings) -> Void) {
        state.withLock { state in
            change(&state.settings)
            for entry in state.links.values {
                let link = entry.link
                link.eventLoop.execute { link.value.settingsChanged() }
            }
        }
    }

    /// Refuses new connections from now on and closes every open one; returns their `closed` futures.
    func shutDown() -> [EventLoopFuture<Void>] {
        state.withLock { state in
            state.stopped = true
            return state.links.values.map { entry in
                let link = entry.link
                link.eventLoop.execute { link.value.abort() }
                return entry.closed
            }
        }
    }
}

// MARK: - One proxied connection

/// One proxied connection: the accepted client channel and its upstream channel, both on the same event loop.
///
/// Everything here runs on that event loop. Each direction keeps a queue of chunks with their due time (receive time
/// plus the latency then in force); a queue is drained while not stalled, chunks that are not due yet wait for a
/// timer. The settings are read from the registry whenever they matter, so a change applies to every byte read
/// after it, even before ``settingsChanged()`` runs.
private final class ProxyLink {
    /// Which peer a channel talks to.
    enum Side: Int {
        case client = 0
        case upstream = 1

        var opposite: Side {
            self == .client ? .upstream : .client
        }
    }

    /// Most bytes a connection may hold undelivered before it is closed.
    static let maximumHeldBytes = 16 << 20

    private enum UpstreamState {
        case connecting
        case open(any Channel)
        case closed
    }

    private struct Chunk {
        var bytes: ByteBuffer
        var due: NIODeadline
    }

    /// Bytes received from one side, on their way to the other.
    private struct Direction {
        var queue = CircularBuffer<Chunk>()
        var timer: Scheduled<Void>?
        var timerDeadline: NIODeadline?
        /// The sending side has closed: close the receiving side once the queue is delivered.
        var sourceEnded = false
        /// That close has been started.
        var closingDestination = false
    }

    /// Completed (on the event loop) once both channels are closed.
    var closed: EventLoopFuture<Void> {
        closedPromise.futureResult
    }

    private let eventLoop: any EventLoop
    private let registry: ProxyRegistry
    private let client: any Channel
    private let closedPromise: EventLoopPromise<Void>
    private var clientOpen = true
    private var upstream = UpstreamState.connecting
    /// Set by ``abort()``: nothing is forwarded any more, both channels are (being) closed.
    private var aborted = false
    private var finished = false
    /// Indexed by the side the bytes come from (`Side.rawValue`).
    private var directions = [Direction(), Direction()]
    private var heldBytes = 0

    /// Called with the registry's lock held: must not read ``ProxyRegistry/settings``.
    init(client: any Channel, registry: ProxyRegistry) {
        self.eventLoop = client.eventLoop
        self.registry = registry
        self.client = client
        self.closedPromise = client.eventLoop.makePromise(of: Void.self)
    }

    /// Installs the client handler and connects to `upstream` (on the same event loop).
    func start(upstream address: SocketAddress) {
        eventLoop.preconditionInEventLoop()
        do {
            try client.pipeline.syncOperations.addHandler(ProxySideHandler(link: self, side: .client))
        } catch {
            abort()
        }
        client.closeFuture.assumeIsolated().whenComplete { _ in
            self.sideClosed(.client)
        }
        let loopBoundSelf = NIOLoopBound(self, eventLoop: eventLoop)
        ClientBootstrap(group: eventLoop)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(.seconds(5))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ProxySideHandler(link: loopBoundSelf.value, side: .upstream))
                }
            }
            .connect(to: address)
            .assumeIsolated()
            .whenComplete { result in
                self.upstreamConnectFinished(result)
            }
    }

    /// Acts on changed settings (see ``ProxyRegistry/update(_:)``): closes the connection when cut, delivers what
    /// was held otherwise.
    func settingsChanged() {
        guard !aborted else { return }
        if registry.settings.mode == .cut {
            abort()
            return
        }
        pump(from: .client)
        pump(from: .upstream)
    }

    /// Bytes read from `side`.
    func received(_ bytes: ByteBuffer, from side: Side) {
        guard !aborted, !directions[side.rawValue].sourceEnded else { return }
        let settings = registry.settings
        guard settings.mode != .cut else {
            abort()
            return
        }
        heldBytes += bytes.readableBytes
        guard heldBytes <= Self.maximumHeldBytes else {
            abort()
            return
        }
        directions[side.rawValue].queue.append(Chunk(bytes: bytes, due: .now() + settings.latency))
        pump(from: side)
    }

    /// Closes both channels at once, dropping everything held. Idempotent.
    func abort() {
        guard !aborted else { return }
        aborted = true
        dropQueue(from: .client)
        dropQueue(from: .upstream)
        if clientOpen {
            client.close(promise: nil)
        }
        if case .open(let channel) = upstream {
            channel.close(promise: nil)
        }
        // A connection attempt still in flight is closed by `upstreamConnectFinished`.
    }

    private func upstreamConnectFinished(_ result: Result<any Channel, any Error>) {
        switch result {
        case .success(let channel):
            guard case .connecting = upstream else {
                channel.close(promise: nil)
                return
            }
            upstream = .open(channel)
            channel.closeFuture.assumeIsolated().whenComplete { _ in
                self.sideClosed(.upstream)
            }
            if aborted {
                channel.close(promise: nil)
            } else {
                pump(from: .client)
            }
        case .failure:
            upstream = .closed
            abort()
            finishIfClosed()
        }
    }

    /// `side`'s channel has closed: deliver what it sent to the other side, then close that one too.
    private func sideClosed(_ side: Side) {
        switch side {
        case .client: clientOpen = false
        case .upstream: upstream = .closed
        }
        if !aborted {
            dropQueue(from: side.opposite)
            directions[side.rawValue].sourceEnded = true
            pump(from: side)
        }
        finishIfClosed()
    }

    private func finishIfClosed() {
        guard !finished, !clientOpen, case .closed = upstream else { return }
        finished = true
        dropQueue(from: .client)
        dropQueue(from: .upstream)
        closedPromise.succeed(())
    }

    /// The open channel of `side`, or nil while connecting or once closed.
    private func channel(_ side: Side) -> (any Channel)? {
        switch side {
        case .client:
            return clientOpen ? client : nil
        case .upstream:
            if case .open(let channel) = upstream { return channel }
            return nil
        }
    }

    /// Writes every due chunk received from `source` to the other side, and arms a timer for the next one.
    private func pump(from source: Side) {
        guard !aborted, let destination = channel(source.opposite), registry.settings.mode == .forwarding else { return }
        let index = source.rawValue
        let now = NIODeadline.now()
        var wrote = false
        while let head = directions[index].queue.first {
            guard head.due <= now else {
                armTimer(from: source, for: head.due)
                break
            }
            directions[index].queue.removeFirst()
            heldBytes -= head.bytes.readableBytes
            destination.write(head.bytes, promise: nil)
            wrote = true
        }
        if wrote {
            destination.flush()
        }
        if directions[index].queue.isEmpty, directions[index].sourceEnded, !directions[index].closingDestination {
            directions[index].closingDestination = true
            // Close only after the written bytes went out (closing fails pending writes).
            destination.writeAndFlush(ByteBuffer()).whenComplete { _ in
                destination.close(promise: nil)
            }
        }
    }

    /// Makes sure ``pump(from:)`` runs for `source` at `deadline` (or earlier).
    private func armTimer(from source: Side, for deadline: NIODeadline) {
        let index = source.rawValue
        if let armed = directions[index].timerDeadline, armed <= deadline {
            return
        }
        directions[index].timer?.cancel()
        directions[index].timerDeadline = deadline
        directions[index].timer = eventLoop.assumeIsolated().scheduleTask(deadline: deadline) {
            self.directions[index].timer = nil
            self.directions[index].timerDeadline = nil
            self.pump(from: source)
        }
    }

    private func dropQueue(from side: Side) {
        let index = side.rawValue
        directions[index].timer?.cancel()
        directions[index].timer = nil
        directions[index].timerDeadline = nil
        for chunk in directions[index].queue {
            heldBytes -= chunk.bytes.readableBytes
        }
        directions[index].queue.removeAll()
    }
}

/// Feeds one channel's reads and errors to its ``ProxyLink``.
private final class ProxySideHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private let link: ProxyLink
    private let side: ProxyLink.Side

    init(link: ProxyLink, side: ProxyLink.Side) {
        self.link = link
        self.side = side
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        link.received(Self.unwrapInboundIn(data), from: side)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A reset, a failed write, ...: the connection is broken, close both sides.
        link.abort()
    }
}
