// Creates (or updates) the application user: dbOwner on the app database,
// authenticating against that database (authSource=innova_db in MONGO_URI).
// Run by the mongo image on first init (/docker-entrypoint-initdb.d), and by
// deploy/mongo/create-appuser.sh on an existing database. Idempotent.
const dbName = process.env.INNOVA_DB_NAME || "innova_db";
const user = process.env.INNOVA_APP_USER || "appuser";
const pwd = process.env.INNOVA_APP_PASSWORD;
if (!pwd) {
  throw new Error("INNOVA_APP_PASSWORD is not set");
}
const appDb = db.getSiblingDB(dbName);
// Also the owner of the scratch database of the monthly restore check
// (deploy/backup/restore-check.py), which it fills and drops.
const scratchDb = process.env.INNOVA_RESTORE_CHECK_DB || "innova_restore_check";
const roles = [
  { role: "dbOwner", db: dbName },
  { role: "dbOwner", db: scratchDb },
];
if (appDb.getUser(user)) {
  appDb.updateUser(user, { pwd: pwd, roles: roles });
  print(`updated user ${user} (dbOwner on ${dbName} and ${scratchDb})`);
} else {
  appDb.createUser({ user: user, pwd: pwd, roles: roles });
  print(`created user ${user} (dbOwner on ${dbName} and ${scratchDb})`);
}
