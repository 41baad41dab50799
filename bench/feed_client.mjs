// Load client for bench/feed.py: opens N feed sockets, records when each
// interaction.created event arrives, prints the records when stdin closes.
// Run with: node --experimental-websocket bench/feed_client.mjs URL KEY N
const [url, key, count] = process.argv.slice(2);
const received = [];
let ready = 0;
const now = () => performance.timeOrigin + performance.now();

for (let i = 0; i < Number(count); i++) {
  const socket = new WebSocket(url.replace(/^http/, "ws") + "/api/feed/ws");
  socket.onopen = () => socket.send(JSON.stringify({ type: "auth", token: key }));
  socket.onmessage = (message) => {
    const at = now();
    const event = JSON.parse(message.data);
    if (event.type === "ready" && ++ready === Number(count)) console.log("ready");
    if (event.type === "interaction.created") received.push([event.data.id, at / 1000]);
  };
  socket.onerror = (error) => console.error("socket error", error.message);
}

process.stdin.on("data", () => {});
process.stdin.on("end", () => {
  process.stdout.write(JSON.stringify(received) + "\n", () => process.exit(0));
});
