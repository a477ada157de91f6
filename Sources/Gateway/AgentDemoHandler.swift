import Foundation

/// The default session handler: JSON text messages with a small echo and a scripted agent run.
///
/// - `{"type":"echo", ...}` is sent back as it came.
/// - `{"type":"run", "prompt": "..."}` streams `agent_started`, `agent_thinking`, `tool_executing`, `tool_completed`
///   and `agent_completed`, each `{"type": ..., "run_id": ..., "seq": n}` (1–5), with `step_delay` between them.
/// - Anything else gets `{"type":"error","error": ...,"message": ...}`, and the connection stays open.
public struct AgentDemoHandler: GatewaySessionHandler {
    /// The pause between the events of a run. Defaults to 50 ms.
    public var stepDelay: Duration

    /// Creates the handler.
    public init(stepDelay: Duration = .milliseconds(50)) {
        self.stepDelay = stepDelay
    }

    /// The events of a run, in order.
    public static let runEvents = ["agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed"]

    public func run(_ session: GatewaySession) async throws {
        var runs = 0
        for await message in session.messages {
            guard case .text(let text) = message else {
                try await session.send(text: Self.error("binary_not_supported", "send JSON text messages"))
                continue
            }
            guard let object = JSON.decode(ClientMessage.self, from: text) else {
                try await session.send(text: Self.error("invalid_json", "a message must be a JSON object with a \"type\""))
                continue
            }
            switch object.type {
            case "echo":
                try await session.send(text: text)
            case "run":
                runs += 1
                let runID = "\(session.connectionID)-\(runs)"
                for (index, event) in Self.runEvents.enumerated() {
                    if index > 0 { try await Task.sleep(for: stepDelay) }
                    var runEvent = RunEvent(type: event, runID: runID, seq: index + 1)
                    switch event {
                    case "agent_started": runEvent.prompt = object.prompt ?? ""
                    case "tool_executing", "tool_completed": runEvent.tool = "search"
                    case "agent_completed": runEvent.result = "done"
                    default: break
                    }
                    try await session.send(text: JSON.encode(runEvent))
                }
            case let type?:
                try await session.send(text: Self.error("unknown_type", "unknown message type \"\(type.prefix(64))\"; use echo or run"))
            case nil:
                try await session.send(text: Self.error("invalid_message", "a message must be a JSON object with a \"type\""))
            }
        }
    }

    static func error(_ code: String, _ message: String) -> String {
        JSON.encode(MessageError(error: code, message: message))
    }

    /// A client message: any JSON object; `type` and `prompt` count only when they are strings.
    struct ClientMessage: Decodable {
        var type: String?
        var prompt: String?

        enum CodingKeys: String, CodingKey {
            case type, prompt
        }

        init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            type = try? container.decodeIfPresent(String.self, forKey: .type)
            prompt = try? container.decodeIfPresent(String.self, forKey: .prompt)
        }
    }

    /// One event of a run.
    struct RunEvent: Encodable {
        var type: String
        var runID: String
        var seq: Int
        var prompt: String?
        var tool: String?
        var result: String?
    }

    /// `{"type":"error","error": code,"message": ...}`.
    struct MessageError: Encodable {
        var type = "error"
        var error: String
        var message: String
    }
}
