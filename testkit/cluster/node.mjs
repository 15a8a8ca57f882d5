// One node of the test kit's clustered broker: Aedes over TLS, nodes sharing one Redis for
// sessions, subscriptions and retained/offline messages (aedes-persistence-redis) and for
// routing publishes between nodes (mqemitter-redis). Started by testkit/src/cluster.rs.
//
// node node.mjs --port P --redis-port R --ca CA --cert CERT --key KEY [--id NAME]
//               [--persistence redis|memory]
// `memory` makes a node that shares routing but no sessions (like a cluster without session
// sharing). Prints "ready <port>" once listening, then the lines `conn MS ID` (a client
// connected) and `stats MS PUBLISHES CLIENTS` (every second).
import { createServer } from 'node:tls'
import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { Aedes } from 'aedes'

const require = createRequire(import.meta.url)
const redisPersistence = require('aedes-persistence-redis')
const MQEmitterRedis = require('mqemitter-redis')

const args = {}
for (let i = 2; i < process.argv.length; i += 2) {
  args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1]
}
for (const k of ['port', 'redis-port', 'ca', 'cert', 'key']) {
  if (!args[k]) {
    console.error(`missing --${k}`)
    process.exit(2)
  }
}
const redis = { host: '127.0.0.1', port: Number(args['redis-port']) }
const opts = {
  id: args.id,
  // No ready check (INFO) on the routing connections: a SUBSCRIBE sent while ioredis still
  // waits to run it (a client subscribing right after start) makes INFO fail on a connection
  // now in subscriber mode, which ioredis treats as fatal and the node dies.
  mq: MQEmitterRedis({ ...redis, enableReadyCheck: false }),
  // A client that stops reading is dropped instead of stalling every other client.
  drainTimeout: 30000
}
if ((args.persistence || 'redis') === 'redis') {
  opts.persistence = redisPersistence({ ...redis, maxSessionDelivery: 100000 })
}
const broker = await Aedes.createBroker(opts)
// What the fleet harness reads (testkit/src/cluster.rs): one line per client connection,
// and once a second the publishes this node received from its clients.
let published = 0
broker.on('client', (client) => console.log(`conn ${Date.now()} ${client.id}`))
broker.on('publish', (packet, client) => { if (client) published++ })
setInterval(() => {
  console.log(`stats ${Date.now()} ${published} ${broker.connectedClients}`)
  published = 0
}, 1000).unref()
const server = createServer({
  ca: readFileSync(args.ca),
  cert: readFileSync(args.cert),
  key: readFileSync(args.key),
  requestCert: true,
  rejectUnauthorized: true
}, broker.handle)
server.on('tlsClientError', () => {})
server.listen(Number(args.port), '127.0.0.1', () => {
  console.log(`ready ${args.port}`)
})
const stop = () => server.close(() => broker.close(() => process.exit(0)))
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
