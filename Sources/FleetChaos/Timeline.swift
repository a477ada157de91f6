import Foundation

extension ChaosReport {
    /// An SVG timeline of the run: connections per node and entries in Redis above; stale, lost and over-limit counts
    /// below; faults as vertical lines with their labels, and each SIGKILL's eviction and recovery marked.
    public var svg: String {
        let width = 1000.0
        let left = 60.0
        let right = 20.0
        let plotWidth = width - left - right
        let topPanel = (y: 110.0, height: 250.0)
        let bottomPanel = (y: 410.0, height: 140.0)
        let height = bottomPanel.y + bottomPanel.height + 60
        let end = max(samples.last?.t ?? 1, 1)
        func x(_ t: Double) -> Double { left + plotWidth * t / end }
        let palette = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
        var out: [String] = []
        out.append(
            ##"<svg xmlns="http://www.w3.org/2000/svg" width="\##(Int(width))" height="\##(Int(height))" font-family="sans-serif" font-size="11">"##)
        out.append(##"<rect width="100%" height="100%" fill="white"/>"##)
        out.append(
            ##"<text x="\##(left)" y="20" font-size="14" font-weight="bold">\##(Self.escape("fleetgate chaos — \(scenario.name): \(nodes) nodes, \(users) users × \(attempts) attempts, limit \(limit)"))</text>"##
        )

        func panel(_ y: Double, _ height: Double, maximum: Double, title: String) {
            out.append(##"<rect x="\##(left)" y="\##(y)" width="\##(plotWidth)" height="\##(height)" fill="none" stroke="#ccc"/>"##)
            out.append(##"<text x="\##(left)" y="\##(y - 6)" font-weight="bold">\##(Self.escape(title))</text>"##)
            for step in 0...4 {
                let value = maximum * Double(step) / 4
                let lineY = y + height - height * Double(step) / 4
                out.append(##"<text x="\##(left - 6)" y="\##(lineY + 4)" text-anchor="end" fill="#666">\##(Int(value.rounded()))</text>"##)
                out.append(##"<line x1="\##(left)" y1="\##(lineY)" x2="\##(left + plotWidth)" y2="\##(lineY)" stroke="#eee"/>"##)
            }
        }
        func series(_ values: [(Double, Double?)], y: Double, height: Double, maximum: Double, color: String, dashed: Bool = false) {
            var path = ""
            var drawing = false
            for (t, value) in values {
                guard let value else {
                    drawing = false
                    continue
                }
                let pointY = y + height - height * min(value, maximum) / max(maximum, 1)
                path += String(format: "%@%.1f,%.1f ", drawing ? "L" : "M", x(t), pointY)
                drawing = true
            }
            out.append(
                ##"<path d="\##(path)" fill="none" stroke="\##(color)" stroke-width="1.5"\##(dashed ? ##" stroke-dasharray="4 3""## : "")/>"##)
        }

        // Top: sockets per node, entries in Redis.
        let topMaximum = Double(max(samples.map { $0.entries ?? 0 }.max() ?? 0, samples.map { $0.sockets.reduce(0, +) }.max() ?? 0, 1)) * 1.1
        panel(topPanel.y, topPanel.height, maximum: topMaximum, title: "connections per node (sockets the clients hold), entries in Redis (dashed)")
        for slot in 0..<nodes {
            series(
                samples.map { ($0.t, Double($0.sockets.indices.contains(slot) ? $0.sockets[slot] : 0)) }, y: topPanel.y, height: topPanel.height,
                maximum: topMaximum, color: palette[slot % palette.count])
        }
        series(
            samples.map { ($0.t, $0.entries.map(Double.init)) }, y: topPanel.y, height: topPanel.height, maximum: topMaximum, color: "#333",
            dashed: true)
        series(
            samples.map { ($0.t, Double($0.sockets.reduce(0, +))) }, y: topPanel.y, height: topPanel.height, maximum: topMaximum, color: "#aaa")

        // Bottom: stale, lost, users over the limit.
        let bottomMaximum = Double(max(samples.map { max($0.stale ?? 0, $0.lost ?? 0, $0.overLimit) }.max() ?? 0, 4)) * 1.1
        panel(
            bottomPanel.y, bottomPanel.height, maximum: bottomMaximum,
            title: "stale entries (orange), lost entries (blue), users over the limit (red)")
        series(
            samples.map { ($0.t, $0.stale.map(Double.init)) }, y: bottomPanel.y, height: bottomPanel.height, maximum: bottomMaximum, color: "#ff7f0e")
        series(
            samples.map { ($0.t, $0.lost.map(Double.init)) }, y: bottomPanel.y, height: bottomPanel.height, maximum: bottomMaximum, color: "#1f77b4")
        series(samples.map { ($0.t, Double($0.overLimit)) }, y: bottomPanel.y, height: bottomPanel.height, maximum: bottomMaximum, color: "#d62728")

        // Events: vertical lines across both panels, labels staggered above the top panel.
        var rowEnds = [Double](repeating: -.infinity, count: 6)
        for event in events {
            let color = ["kill": "#d62728", "heal": "#2ca02c", "load": "#999", "end": "#999", "note": "#bbb"][event.kind] ?? "#ff7f0e"
            out.append(
                ##"<line x1="\##(x(event.t))" y1="\##(topPanel.y)" x2="\##(x(event.t))" y2="\##(bottomPanel.y + bottomPanel.height)" stroke="\##(color)" stroke-dasharray="2 2"/>"##
            )
            // A label goes in the first of the six rows where it does not run into the previous one; notes
            // (re-registrations) and labels with no room keep only their line, so a long run stays readable.
            guard event.kind != "note" || events.count <= 40 else { continue }
            let start = x(event.t) + 2
            let width = Double(event.label.count) * 6.2
            guard let row = rowEnds.firstIndex(where: { $0 < start }) else { continue }
            rowEnds[row] = start + width
            let labelY = 36 + Double(row) * 11
            out.append(##"<text x="\##(start)" y="\##(labelY)" fill="\##(color)">\##(Self.escape(event.label))</text>"##)
        }
        // Each SIGKILL: its entries gone (circle) and its users back at the limit (triangle), on the top panel's floor.
        for kill in kills {
            if let gone = kill.entriesGoneAfter {
                out.append(##"<circle cx="\##(x(kill.at + gone))" cy="\##(topPanel.y + topPanel.height - 6)" r="5" fill="#d62728"/>"##)
                out.append(
                    ##"<text x="\##(x(kill.at + gone) + 7)" y="\##(topPanel.y + topPanel.height - 10)" fill="#d62728">\##(String(format: "entries gone %.1f s", gone))</text>"##
                )
            }
            if let back = kill.usersBackAfter {
                let cx = x(kill.at + back)
                let cy = topPanel.y + topPanel.height - 22
                out.append(##"<path d="M\##(cx),\##(cy - 6) L\##(cx - 5),\##(cy + 4) L\##(cx + 5),\##(cy + 4) Z" fill="#2ca02c"/>"##)
                out.append(##"<text x="\##(cx + 7)" y="\##(cy + 2)" fill="#2ca02c">\##(String(format: "users back %.1f s", back))</text>"##)
            }
        }
        // Time axis.
        let step = end > 120 ? 20.0 : end > 40 ? 10.0 : 5.0
        var tick = 0.0
        while tick <= end {
            out.append(
                ##"<text x="\##(x(tick))" y="\##(bottomPanel.y + bottomPanel.height + 16)" text-anchor="middle" fill="#666">\##(Int(tick))s</text>"##)
            tick += step
        }
        // Legend: nodes, and the verdict.
        for slot in 0..<nodes {
            let legendX = left + Double(slot) * 90
            out.append(
                ##"<rect x="\##(legendX)" y="\##(height - 26)" width="12" height="3" fill="\##(palette[slot % palette.count])"/><text x="\##(legendX + 16)" y="\##(height - 22)">node \##(slot + 1)</text>"##
            )
        }
        let failed = checks.filter { !$0.passed }.map(\.name)
        out.append(
            ##"<text x="\##(left + plotWidth)" y="\##(height - 22)" text-anchor="end" fill="\##(failed.isEmpty ? "#2ca02c" : "#d62728")">\##(Self.escape(failed.isEmpty ? "every check passed (peak \(peakPerUser) of \(limit) per user)" : "FAILED: " + failed.joined(separator: ", ")))</text>"##
        )
        out.append("</svg>")
        return out.joined(separator: "\n") + "\n"
    }

    static func escape(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }
}
